// Detection quality: average precision per category, the VOC-style AP at IoU
// 0.5 (AP50) and COCO's AP averaged over IoU 0.50:0.05:0.95, both with
// COCO's 101-point interpolated precision.
//
// Matching (per image, per category, per IoU threshold, as in the COCO
// evaluation): detections are taken by descending score; each is matched to
// the unmatched ground-truth box of highest IoU >= the threshold, else it is
// a false positive (so a duplicate of an already-matched box is a false
// positive). Precision is made monotone (the running maximum from the right),
// then sampled at recall 0, 0.01, ..., 1 (0 where the recall is not
// reached). A category without ground truth is left out of the means (its AP
// is reported as -1).
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dtrain {

struct DetBox {
  float x0 = 0, y0 = 0, x1 = 0, y1 = 0;  // x1, y1 exclusive
};

// Intersection over union; 0 when either box is empty.
double BoxIoU(const DetBox& a, const DetBox& b);

struct ScoredDetection {
  int64_t image = 0;
  int category = 0;
  DetBox box;
  float score = 0;
};

struct GroundTruthBox {
  int64_t image = 0;
  int category = 0;
  DetBox box;
};

// AP of one category at one IoU threshold (101-point interpolation); -1 when
// the category has no ground truth. Detections and ground truth of other
// categories are ignored.
double AveragePrecision(const std::vector<ScoredDetection>& detections, const std::vector<GroundTruthBox>& truth,
                        int category, double iou_threshold);

struct DetectionMetrics {
  std::vector<std::string> categories;
  std::vector<double> ap50;   // per category, -1 without ground truth
  std::vector<double> ap75;
  std::vector<double> ap;     // COCO AP@[.50:.95]
  std::vector<int64_t> ground_truth;  // boxes per category
  std::vector<int64_t> detections;    // detections per category
  // Means over the categories with ground truth; -1 when none has any.
  double mean_ap50 = 0;
  double mean_ap75 = 0;
  double mean_ap = 0;
  int64_t images = 0;
};

// Every figure above for `categories` (category i of the boxes is
// categories[i]); `images` is recorded as given.
DetectionMetrics EvaluateDetections(const std::vector<ScoredDetection>& detections,
                                    const std::vector<GroundTruthBox>& truth, const std::vector<std::string>& categories,
                                    int64_t images);

// A table: category, ground truth, detections, AP50, AP75, AP; then the mean.
std::string DetectionTable(const DetectionMetrics& metrics);

}  // namespace dtrain
