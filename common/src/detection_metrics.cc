#include "dtrain/common/detection_metrics.h"

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <unordered_map>
#include <utility>

namespace dtrain {
namespace {

constexpr int kRecallPoints = 101;  // recall 0, 0.01, ..., 1

// One category's detections, ranked, each with the ground-truth boxes of its
// image it could match (index among the category's ground truth, IoU).
struct RankedCategory {
  int64_t ground_truth = 0;
  std::vector<std::vector<std::pair<int64_t, double>>> candidates;  // per detection, by descending score
};

RankedCategory Rank(const std::vector<ScoredDetection>& detections, const std::vector<GroundTruthBox>& truth,
                    int category) {
  RankedCategory r;
  std::unordered_map<int64_t, std::vector<int64_t>> truth_of_image;  // image -> indices into `truth`
  for (size_t i = 0; i < truth.size(); ++i) {
    if (truth[i].category != category) continue;
    truth_of_image[truth[i].image].push_back(static_cast<int64_t>(i));
  }
  // Ground truth numbered within the category.
  std::unordered_map<int64_t, int64_t> number;
  for (size_t i = 0; i < truth.size(); ++i) {
    if (truth[i].category == category) number[static_cast<int64_t>(i)] = r.ground_truth++;
  }
  std::vector<size_t> order;
  for (size_t i = 0; i < detections.size(); ++i) {
    if (detections[i].category == category) order.push_back(i);
  }
  // Descending score; ties keep the input order (as COCO's stable sort).
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return detections[a].score > detections[b].score; });
  r.candidates.resize(order.size());
  for (size_t k = 0; k < order.size(); ++k) {
    const ScoredDetection& d = detections[order[k]];
    auto it = truth_of_image.find(d.image);
    if (it == truth_of_image.end()) continue;
    for (int64_t t : it->second) r.candidates[k].emplace_back(number[t], BoxIoU(d.box, truth[static_cast<size_t>(t)].box));
  }
  return r;
}

double RankedAP(const RankedCategory& r, double iou_threshold) {
  if (r.ground_truth == 0) return -1.0;
  const size_t n = r.candidates.size();
  std::vector<bool> matched(static_cast<size_t>(r.ground_truth), false);
  std::vector<int64_t> tp(n);   // cumulative true positives after detection k
  std::vector<double> precision(n);
  int64_t tps = 0;
  for (size_t k = 0; k < n; ++k) {
    int64_t best = -1;
    double best_iou = 0;
    for (const auto& [g, iou] : r.candidates[k]) {
      if (matched[static_cast<size_t>(g)] || iou < iou_threshold) continue;
      if (best < 0 || iou > best_iou) {
        best = g;
        best_iou = iou;
      }
    }
    if (best >= 0) {
      matched[static_cast<size_t>(best)] = true;
      ++tps;
    }
    tp[k] = tps;
    precision[k] = static_cast<double>(tps) / static_cast<double>(k + 1);
  }
  // Monotone precision: the running maximum from the right.
  for (size_t k = n; k-- > 1;) precision[k - 1] = std::max(precision[k - 1], precision[k]);
  // Sample at recall j/100: the first rank whose recall tp/G >= j/100,
  // compared exactly as tp * 100 >= j * G.
  double sum = 0;
  size_t k = 0;
  for (int j = 0; j < kRecallPoints; ++j) {
    while (k < n && tp[k] * (kRecallPoints - 1) < static_cast<int64_t>(j) * r.ground_truth) ++k;
    if (k == n) break;  // this recall (and every higher one) is never reached: 0
    sum += precision[k];
  }
  return sum / kRecallPoints;
}

double MeanOfKnown(const std::vector<double>& v) {
  double sum = 0;
  int count = 0;
  for (double x : v) {
    if (x < 0) continue;
    sum += x;
    ++count;
  }
  return count == 0 ? -1.0 : sum / count;
}

}  // namespace

double BoxIoU(const DetBox& a, const DetBox& b) {
  const double aw = static_cast<double>(a.x1) - a.x0, ah = static_cast<double>(a.y1) - a.y0;
  const double bw = static_cast<double>(b.x1) - b.x0, bh = static_cast<double>(b.y1) - b.y0;
  if (!(aw > 0 && ah > 0 && bw > 0 && bh > 0)) return 0.0;
  const double iw = std::min<double>(a.x1, b.x1) - std::max<double>(a.x0, b.x0);
  const double ih = std::min<double>(a.y1, b.y1) - std::max<double>(a.y0, b.y0);
  if (iw <= 0 || ih <= 0) return 0.0;
  const double inter = iw * ih;
  return inter / (aw * ah + bw * bh - inter);
}

double AveragePrecision(const std::vector<ScoredDetection>& detections, const std::vector<GroundTruthBox>& truth,
                        int category, double iou_threshold) {
  return RankedAP(Rank(detections, truth, category), iou_threshold);
}

DetectionMetrics EvaluateDetections(const std::vector<ScoredDetection>& detections,
                                    const std::vector<GroundTruthBox>& truth, const std::vector<std::string>& categories,
                                    int64_t images) {
  DetectionMetrics m;
  m.categories = categories;
  m.images = images;
  const size_t nc = categories.size();
  m.ap50.assign(nc, -1.0);
  m.ap75.assign(nc, -1.0);
  m.ap.assign(nc, -1.0);
  m.ground_truth.assign(nc, 0);
  m.detections.assign(nc, 0);
  for (const ScoredDetection& d : detections) {
    if (d.category >= 0 && static_cast<size_t>(d.category) < nc) ++m.detections[static_cast<size_t>(d.category)];
  }
  for (size_t c = 0; c < nc; ++c) {
    const RankedCategory r = Rank(detections, truth, static_cast<int>(c));
    m.ground_truth[c] = r.ground_truth;
    if (r.ground_truth == 0) continue;
    m.ap50[c] = RankedAP(r, 0.5);
    m.ap75[c] = RankedAP(r, 0.75);
    double sum = 0;
    for (int t = 0; t < 10; ++t) sum += RankedAP(r, 0.5 + 0.05 * t);
    m.ap[c] = sum / 10;
  }
  m.mean_ap50 = MeanOfKnown(m.ap50);
  m.mean_ap75 = MeanOfKnown(m.ap75);
  m.mean_ap = MeanOfKnown(m.ap);
  return m;
}

std::string DetectionTable(const DetectionMetrics& m) {
  auto figure = [](double v) {
    char buf[16];
    if (v < 0) return std::string("     -");
    std::snprintf(buf, sizeof buf, "%6.4f", v);
    return std::string(buf);
  };
  std::string out;
  char line[256];
  std::snprintf(line, sizeof line, "%-14s %12s %10s %8s %8s %8s\n", "category", "ground truth", "detections", "AP50",
                "AP75", "AP");
  out += line;
  int64_t gt = 0, dets = 0;
  for (size_t c = 0; c < m.categories.size(); ++c) {
    const int64_t g = c < m.ground_truth.size() ? m.ground_truth[c] : 0;
    const int64_t d = c < m.detections.size() ? m.detections[c] : 0;
    gt += g;
    dets += d;
    std::snprintf(line, sizeof line, "%-14s %12lld %10lld %8s %8s %8s\n", m.categories[c].c_str(),
                  static_cast<long long>(g), static_cast<long long>(d),
                  figure(c < m.ap50.size() ? m.ap50[c] : -1).c_str(), figure(c < m.ap75.size() ? m.ap75[c] : -1).c_str(),
                  figure(c < m.ap.size() ? m.ap[c] : -1).c_str());
    out += line;
  }
  std::snprintf(line, sizeof line, "%-14s %12lld %10lld %8s %8s %8s\n", "mean", static_cast<long long>(gt),
                static_cast<long long>(dets), figure(m.mean_ap50).c_str(), figure(m.mean_ap75).c_str(),
                figure(m.mean_ap).c_str());
  out += line;
  std::snprintf(line, sizeof line, "(%lld images; AP is COCO's AP@[.50:.95], 101-point interpolation)\n",
                static_cast<long long>(m.images));
  out += line;
  return out;
}

}  // namespace dtrain
