// The snap index (indexer/snap_index.h): building from generated snaps with
// real (small) models, querying, the three box modes, per-category
// embedders, the pictures, and bad input that must leave no index behind.
#include "dtrain/indexer/snap_index.h"

#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include <google/protobuf/text_format.h>

#include "dtrain/common/config.h"
#include "dtrain/data/fashion_mnist.h"
#include "dtrain/data/image_io.h"
#include "dtrain/data/snaps.h"
#include "dtrain/indexer/searcher.h"
#include "dtrain/models/detector.h"
#include "dtrain/models/registry.h"
#include "dtrain/worker/strategy.h"
#include "dtrain/worker/trainer.h"
#include "embedder_run.h"

namespace dtrain::indexer {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::vector<std::string> Coarse() {
  std::vector<std::string> v;
  for (const char* c : data::CoarseCategoryNames()) v.emplace_back(c);
  return v;
}

class SnapIndexTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    test_split_ = new data::Dataset();
    data::FashionMnistOptions fo;
    fo.split = data::Split::kTest;
    fo.limit = 2000;
    Status st = data::LoadFashionMnist(fo, test_split_);
    ASSERT_TRUE(st.ok()) << st;
  }
  static void TearDownTestSuite() {
    delete test_split_;
    test_split_ = nullptr;
    if (!trained_run_.empty()) fs::remove_all(fs::path(trained_run_).parent_path());
  }

  // An ArcFace embedder trained for one short epoch (32 steps of 128 train
  // images), made once for the suite: a reasonable embedder, in seconds.
  static std::string TrainedEmbedderRun() {
    if (!trained_run_.empty()) return trained_run_;
    // Per process: ctest runs the suite's tests as concurrent processes.
    const fs::path root = fs::temp_directory_path() / ("dtrain_snapidx_trained_" + std::to_string(::getpid()));
    fs::remove_all(root);
    const fs::path run = root / "run";
    JobConfig config;
    Status st = ParseJobConfig(R"(
        name: "snap_embedder"
        model { widths: [8, 16] embedding_dim: 16 }
        loss { name: "arcface" }
        data { batch_size: 128 train_limit: 4096 }
        optimizer { lr: 0.1 }
        training { epochs: 1 log_every_steps: 100 progress_bar: false threads: 2 }
        eval { at_end: false }
        index { build_at_end: false }
      )",
                               "snap_embedder.textproto", {"run_dir=" + run.string()}, &config);
    EXPECT_TRUE(st.ok()) << st;
    std::unique_ptr<worker::Trainer> trainer;
    worker::TrainerOptions to;
    to.progress = false;
    to.evaluate = false;
    st = worker::Trainer::Create(config, std::make_unique<worker::LocalStrategy>(), to, &trainer);
    EXPECT_TRUE(st.ok()) << st;
    worker::TrainResult r;
    st = trainer->Run(&r);
    EXPECT_TRUE(st.ok()) << st;
    trained_run_ = run.string();
    return trained_run_;
  }

  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dtrain_snapidx_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    torch::manual_seed(11);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // `n` snaps of 64x64 with 2-3 items from the first 2,000 test images.
  static std::vector<data::Snap> MakeSnaps(int n, uint64_t seed = 5, float scale = 0) {
    data::SnapOptions so;
    so.canvas = 64;
    if (scale > 0) so.min_scale = so.max_scale = scale;
    so.min_items = 2;
    so.max_items = 3;
    so.seed = seed;
    data::SnapGenerator gen;
    Status st = data::SnapGenerator::Create(*test_split_, so, &gen);
    EXPECT_TRUE(st.ok()) << st;
    std::vector<data::Snap> snaps;
    for (int i = 0; i < n; ++i) snaps.push_back(gen.Generate(i));
    return snaps;
  }

  // A snap directory of `n` generated snaps; returns them as read back.
  std::string MakeSnapDir(const std::string& name, int n, std::vector<data::Snap>* read_back = nullptr,
                          float scale = 0) {
    const std::string dir = (dir_ / name).string();
    Status st = data::WriteSnapDirectory(dir, MakeSnaps(n, 5, scale), Coarse());
    EXPECT_TRUE(st.ok()) << st;
    if (read_back) {
      std::vector<std::string> cats;
      st = data::ReadSnapDirectory(dir, true, read_back, &cats);
      EXPECT_TRUE(st.ok()) << st;
    }
    return dir;
  }

  // A finished embedder run (config.textproto + model.pt), untrained.
  std::string MakeEmbedderRun(const std::string& name, int embedding_dim = 16) {
    const fs::path run = dir_ / name;
    testing::MakeEmbedderRun(run, embedding_dim);
    return run.string();
  }

  // A small untrained detector model file (real weights, random).
  std::string MakeDetector(const std::string& name, const std::vector<std::string>& categories = {}) {
    ModelConfig mc;
    mc.set_name("centernet_detector");
    DetectorConfig* d = mc.mutable_detector();
    d->add_widths(8);
    d->add_widths(8);
    d->set_head_width(8);
    for (const std::string& c : categories) d->add_categories(c);
    models::CenterNet det{nullptr};
    Status st = models::BuildDetector(mc, &det);
    EXPECT_TRUE(st.ok()) << st;
    // Untrained, its boxes would be about 0 px wide (and dropped): bias the
    // size head's output to 5 cells (20 px), the size of an item.
    torch::NoGradGuard no_grad;
    torch::Tensor size_bias;
    for (const auto& p : det->named_parameters()) {
      if (p.key().rfind("size.", 0) == 0 && p.key().size() >= 4 &&
          p.key().compare(p.key().size() - 4, 4, "bias") == 0) {
        size_bias = p.value();  // the last one is the output layer's
      }
    }
    EXPECT_TRUE(size_bias.defined());
    if (size_bias.defined()) size_bias.fill_(5.0);
    const std::string path = (dir_ / (name + ".pt")).string();
    st = worker::SaveModel(*det, mc, path);
    EXPECT_TRUE(st.ok()) << st;
    return path;
  }

  // A ground-truth snap index (dir_/index) of `n` snaps with an untrained
  // embedder; its options, output_dir empty when the build failed.
  SnapIndexOptions BuildTruthIndex(int n) {
    SnapIndexOptions o = Options(MakeSnapDir("snaps", n), (dir_ / "index").string());
    o.boxes = SnapBoxes::kGroundTruth;
    o.embedder = MakeEmbedderRun("emb");
    Status st = BuildSnapIndex(o, nullptr);
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) o.output_dir.clear();
    return o;
  }

  SnapIndexOptions Options(const std::string& snap_dir, const std::string& out) {
    SnapIndexOptions o;
    o.snap_dir = snap_dir;
    o.output_dir = out;
    o.progress = false;
    o.threads = 1;
    return o;
  }

  static std::unique_ptr<SnapIndex> Open(const std::string& dir) {
    SnapIndexOpenOptions oo;
    oo.index_dir = dir;
    oo.threads = 1;
    std::unique_ptr<SnapIndex> index;
    Status st = SnapIndex::Open(oo, &index);
    EXPECT_TRUE(st.ok()) << st;
    return index;
  }

  // True when nothing named <out> or <out>.tmp-* exists.
  static bool NothingWritten(const std::string& out) {
    if (fs::exists(out)) return false;
    const std::string prefix = fs::path(out).filename().string() + ".tmp-";
    for (const auto& e : fs::directory_iterator(fs::path(out).parent_path())) {
      if (e.path().filename().string().rfind(prefix, 0) == 0) return false;
    }
    return true;
  }

  static data::GrayImage SourceImage(int64_t index) {
    data::GrayImage g;
    g.rows = test_split_->rows;
    g.cols = test_split_->cols;
    g.pixels.assign(test_split_->image(index), test_split_->image(index) + g.rows * g.cols);
    return g;
  }

  static data::Dataset* test_split_;
  static std::string trained_run_;
  fs::path dir_;
};

data::Dataset* SnapIndexTest::test_split_ = nullptr;
std::string SnapIndexTest::trained_run_;

TEST_F(SnapIndexTest, CropSquareCentresTheBoxInASquareAndPadsWithBlack) {
  data::GrayImage img;
  img.rows = img.cols = 40;
  img.pixels.assign(40 * 40, 200);
  // A 10 x 20 box well inside: a 20 x 20 square of the image, resampled 1:1.
  data::SnapBox inside{10, 10, 20, 30};
  data::GrayImage c = CropSquare(img.pixels.data(), 40, 40, inside, 20);
  ASSERT_EQ(c.rows, 20);
  ASSERT_EQ(c.cols, 20);
  for (uint8_t v : c.pixels) EXPECT_EQ(v, 200);
  // At the left edge the square reaches 5 px past the image: black there.
  data::SnapBox edge{0, 0, 10, 20};
  c = CropSquare(img.pixels.data(), 40, 40, edge, 20);
  for (int y = 0; y < 20; ++y) {
    for (int x = 0; x < 20; ++x) EXPECT_EQ(c.pixels[y * 20 + x], x < 5 ? 0 : 200) << "at " << x << "," << y;
  }
  // The whole image at its own size is the image.
  data::GrayImage ramp;
  ramp.rows = ramp.cols = 28;
  for (int i = 0; i < 28 * 28; ++i) ramp.pixels.push_back(static_cast<uint8_t>((i * 7) % 256));
  c = CropSquare(ramp.pixels.data(), 28, 28, data::SnapBox{0, 0, 28, 28}, 28);
  EXPECT_EQ(c.pixels, ramp.pixels);
  // Shrinking a constant image keeps it constant; a 2:1 shrink of columns
  // alternating 0/100 averages them.
  data::GrayImage stripes;
  stripes.rows = stripes.cols = 56;
  for (int y = 0; y < 56; ++y) {
    for (int x = 0; x < 56; ++x) stripes.pixels.push_back(x % 2 ? 100 : 0);
  }
  c = CropSquare(stripes.pixels.data(), 56, 56, data::SnapBox{0, 0, 56, 56}, 28);
  for (int y = 2; y < 26; ++y) {
    for (int x = 2; x < 26; ++x) EXPECT_NEAR(c.pixels[y * 28 + x], 50, 1) << "at " << x << "," << y;
  }
}

TEST_F(SnapIndexTest, NormalizeCropRemovesTheBackgroundLevelAndStretchesContrast) {
  // An item of 40..140 on a background of 30: background to 0, the item's
  // brightest pixel to 255, linear in between.
  data::GrayImage g;
  g.rows = g.cols = 10;
  g.pixels.assign(100, 30);
  g.pixels[4 * 10 + 4] = 140;
  g.pixels[4 * 10 + 5] = 85;
  g.pixels[5 * 10 + 4] = 20;  // darker than the background
  NormalizeCrop(&g);
  EXPECT_EQ(g.pixels[0], 0);
  EXPECT_EQ(g.pixels[4 * 10 + 4], 255);
  EXPECT_EQ(g.pixels[4 * 10 + 5], 128);  // (85 - 30) * 255 / 110 = 127.5
  EXPECT_EQ(g.pixels[5 * 10 + 4], 0);
  // A blank crop stays black, a clean item on black is only stretched.
  data::GrayImage blank;
  blank.rows = blank.cols = 4;
  blank.pixels.assign(16, 0);
  NormalizeCrop(&blank);
  EXPECT_EQ(blank.pixels, std::vector<uint8_t>(16, 0));
}

TEST_F(SnapIndexTest, GroundTruthIndexFindsTheSnapOfEveryItem) {
  std::vector<data::Snap> snaps;
  const std::string snap_dir = MakeSnapDir("snaps", 24, &snaps);
  SnapIndexOptions o = Options(snap_dir, (dir_ / "index").string());
  o.boxes = SnapBoxes::kGroundTruth;
  o.embedder = TrainedEmbedderRun();
  SnapIndexSummary sum;
  Status st = BuildSnapIndex(o, &sum);
  ASSERT_TRUE(st.ok()) << st;
  int64_t items = 0;
  std::vector<int64_t> per_category(4, 0);
  for (const data::Snap& s : snaps) {
    items += static_cast<int64_t>(s.items.size());
    for (const data::SnapItem& it : s.items) ++per_category[static_cast<size_t>(it.category)];
  }
  EXPECT_EQ(sum.snaps, 24);
  EXPECT_EQ(sum.items, items);
  EXPECT_EQ(sum.categories, Coarse());
  EXPECT_EQ(sum.items_per_category, per_category);
  EXPECT_GT(sum.snaps_per_sec, 0);

  auto index = Open(o.output_dir);
  ASSERT_TRUE(index);
  EXPECT_EQ(index->boxes(), SnapBoxes::kGroundTruth);
  EXPECT_FALSE(index->has_detector());
  EXPECT_EQ(index->categories(), Coarse());
  EXPECT_EQ(index->snap_dir(), fs::absolute(snap_dir).lexically_normal().string());
  ASSERT_EQ(index->snaps().size(), snaps.size());
  for (int c = 0; c < 4; ++c) EXPECT_EQ(index->items(c), per_category[static_cast<size_t>(c)]);
  for (size_t i = 0; i < snaps.size(); ++i) {
    const IndexedSnap& row = index->snaps()[i];
    EXPECT_EQ(row.id, snaps[i].id);
    EXPECT_EQ(row.file_name, snaps[i].file_name);
    ASSERT_EQ(row.items.size(), snaps[i].items.size());
    for (size_t j = 0; j < row.items.size(); ++j) {
      EXPECT_EQ(row.items[j].box.x0, snaps[i].items[j].box.x0);
      EXPECT_EQ(row.items[j].box.y1, snaps[i].items[j].box.y1);
      EXPECT_EQ(row.items[j].category, snaps[i].items[j].category);
      EXPECT_EQ(row.items[j].score, 1.f);
    }
  }
  // Every category's directory is an ordinary index.
  for (const auto& e : fs::directory_iterator(fs::path(o.output_dir) / "categories")) {
    SearcherOptions so;
    so.index_dir = e.path().string();
    so.threads = 1;
    std::unique_ptr<Searcher> s;
    st = Searcher::Open(so, &s);
    EXPECT_TRUE(st.ok()) << st;
  }

  // The item's own crop finds it first, whatever the model: same pixels,
  // same embedding. By its category, and across every category (this index
  // has no detector to predict one).
  int clean_hits = 0, queries = 0;
  double chance = 0;
  for (size_t i = 0; i < snaps.size(); ++i) {
    for (const data::SnapItem& it : snaps[i].items) {
      const data::GrayImage crop = CropSquare(snaps[i].pixels.data(), 64, 64, it.box);
      SnapQueryOptions qo;
      qo.k = 3;
      qo.category = Coarse()[static_cast<size_t>(it.category)];
      SnapQueryResult r;
      st = index->Query(crop, qo, &r);
      ASSERT_TRUE(st.ok()) << st;
      EXPECT_EQ(r.category_source, "given");
      EXPECT_EQ(r.category, it.category);
      ASSERT_FALSE(r.matches.empty());
      const SnapMatch& m = r.matches[0];
      EXPECT_EQ(m.snap_id, snaps[i].id);
      EXPECT_EQ(m.file_name, snaps[i].file_name);
      EXPECT_NEAR(m.embedding_similarity, 1.0, 1e-4);
      EXPECT_EQ(m.item.box.x0, it.box.x0);
      EXPECT_EQ(m.item.box.y0, it.box.y0);
      EXPECT_EQ(m.fine_class, it.fine_class);
      EXPECT_EQ(m.source_index, it.source_index);
      EXPECT_EQ(m.category_name, qo.category);
      std::set<int64_t> distinct;
      for (size_t j = 0; j < r.matches.size(); ++j) {
        EXPECT_TRUE(distinct.insert(r.matches[j].snap_id).second) << "snap listed twice";
        EXPECT_EQ(r.matches[j].item.category, it.category);
        if (j > 0) {
          EXPECT_LE(r.matches[j].similarity, r.matches[j - 1].similarity);
        }
      }
      SnapQueryResult all;
      qo.category.clear();
      ASSERT_TRUE(index->Query(crop, qo, &all).ok());
      EXPECT_EQ(all.category_source, "all");
      EXPECT_EQ(all.category, -1);
      ASSERT_FALSE(all.matches.empty());
      EXPECT_EQ(all.matches[0].snap_id, snaps[i].id);
      // The clean source image (28x28, no background, another scale), by
      // the embedder alone (TemplateReRankingFindsTheVeryItem tests the
      // re-ranking).
      SnapQueryResult clean;
      qo.category = Coarse()[static_cast<size_t>(it.category)];
      qo.pixel_weight = 0;
      qo.instance_weight = 0;
      ASSERT_TRUE(index->Query(SourceImage(it.source_index), qo, &clean).ok());
      ++queries;
      for (const SnapMatch& cm : clean.matches) clean_hits += cm.snap_id == snaps[i].id ? 1 : 0;
      int candidates = 0;  // snaps with an item of this category
      for (const data::Snap& s : snaps) {
        bool has = false;
        for (const data::SnapItem& x : s.items) has |= x.category == it.category;
        candidates += has ? 1 : 0;
      }
      chance += std::min(1.0, 3.0 / candidates);
    }
  }
  // The briefly trained embedder puts the snap that holds the very item in
  // the top 3 for most clean queries (0.80 when written), far above chance
  // (3 of the snaps that have an item of the category: 0.29).
  const double recall3 = static_cast<double>(clean_hits) / queries;
  chance /= queries;
  std::printf("clean-source recall@3: %.3f over %d queries (chance %.3f)\n", recall3, queries, chance);
  EXPECT_GE(recall3, 0.7);
  EXPECT_GE(recall3, chance + 0.3);

  // Without crop normalisation the same embedder does much worse (0.42 when
  // written): backgrounds and lighting it never saw in training.
  o.normalize_crops = false;
  o.output_dir = (dir_ / "raw_crops").string();
  ASSERT_TRUE(BuildSnapIndex(o, nullptr).ok());
  auto raw = Open(o.output_dir);
  ASSERT_TRUE(raw);
  EXPECT_FALSE(raw->normalize_crops());
  int raw_hits = 0;
  for (size_t i = 0; i < snaps.size(); ++i) {
    for (const data::SnapItem& it : snaps[i].items) {
      SnapQueryOptions qo;
      qo.k = 3;
      qo.category = Coarse()[static_cast<size_t>(it.category)];
      qo.pixel_weight = 0;
      qo.instance_weight = 0;
      SnapQueryResult r;
      ASSERT_TRUE(raw->Query(SourceImage(it.source_index), qo, &r).ok());
      for (const SnapMatch& m : r.matches) raw_hits += m.snap_id == snaps[i].id ? 1 : 0;
    }
  }
  const double raw_recall3 = static_cast<double>(raw_hits) / queries;
  std::printf("without crop normalisation: recall@3 %.3f\n", raw_recall3);
  EXPECT_GT(recall3, raw_recall3 + 0.15);
}

TEST_F(SnapIndexTest, DetectedIndexKeepsTheDetectorsBoxesAndPredictsTheCategory) {
  std::vector<data::Snap> snaps;
  const std::string snap_dir = MakeSnapDir("snaps", 6, &snaps);
  SnapIndexOptions o = Options(snap_dir, (dir_ / "index").string());
  o.detector = MakeDetector("det");
  o.embedder = MakeEmbedderRun("emb");
  o.min_score = 0;  // an untrained detector's scores are low; keep its top 3
  o.max_detections = 3;
  SnapIndexSummary sum;
  Status st = BuildSnapIndex(o, &sum);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(sum.snaps, 6);
  EXPECT_GT(sum.items, 0);
  EXPECT_LE(sum.items, 18);
  EXPECT_TRUE(fs::exists(fs::path(o.output_dir) / "detector.pt"));
  auto index = Open(o.output_dir);
  ASSERT_TRUE(index);
  EXPECT_TRUE(index->has_detector());
  EXPECT_EQ(index->boxes(), SnapBoxes::kDetected);
  int64_t table_items = 0;
  for (const IndexedSnap& s : index->snaps()) {
    EXPECT_LE(s.items.size(), 3u);
    table_items += static_cast<int64_t>(s.items.size());
    for (const IndexedItem& it : s.items) {
      EXPECT_GE(it.box.x0, 0);
      EXPECT_GE(it.box.y0, 0);
      EXPECT_LE(it.box.x1, 64);
      EXPECT_LE(it.box.y1, 64);
      EXPECT_GE(it.box.width(), 1);
      EXPECT_GE(it.score, 0);
      EXPECT_LE(it.score, 1);
    }
  }
  EXPECT_EQ(table_items, sum.items);

  const data::GrayImage product = SourceImage(snaps[0].items[0].source_index);
  int predicted = -2;
  float score = -1;
  ASSERT_TRUE(index->PredictCategory(product, &predicted, &score).ok());
  ASSERT_GE(predicted, 0);
  ASSERT_LT(predicted, 4);
  SnapQueryOptions qo;
  qo.k = 4;
  SnapQueryResult r;
  st = index->Query(product, qo, &r);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(r.category_source, "predicted");
  EXPECT_EQ(r.category, predicted);
  EXPECT_FLOAT_EQ(r.category_score, score);
  EXPECT_EQ(r.category_name, Coarse()[static_cast<size_t>(predicted)]);
  std::set<int64_t> with_category;  // snaps with an item of the predicted category
  for (const IndexedSnap& s : index->snaps()) {
    for (const IndexedItem& it : s.items) {
      if (it.category == predicted) with_category.insert(s.id);
    }
  }
  EXPECT_EQ(r.matches.size(), std::min<size_t>(4, with_category.size()));
  for (const SnapMatch& m : r.matches) EXPECT_EQ(m.item.category, predicted);
  // A product of another size is fitted to 28x28 first; --category overrides.
  data::GrayImage big;
  big.rows = 50;
  big.cols = 40;
  big.pixels.assign(50 * 40, 90);
  qo.category = "bags";
  ASSERT_TRUE(index->Query(big, qo, &r).ok());
  EXPECT_EQ(r.category_source, "given");
  EXPECT_EQ(r.category_name, "bags");
  // Batched queries answer as single ones do.
  std::vector<SnapQueryResult> batch;
  qo.category.clear();
  ASSERT_TRUE(index->QueryBatch({product, big}, qo, &batch).ok());
  ASSERT_EQ(batch.size(), 2u);
  SnapQueryResult single;
  ASSERT_TRUE(index->Query(product, qo, &single).ok());
  ASSERT_EQ(batch[0].matches.size(), single.matches.size());
  for (size_t j = 0; j < single.matches.size(); ++j) {
    EXPECT_EQ(batch[0].matches[j].item_id, single.matches[j].item_id);
    EXPECT_NEAR(batch[0].matches[j].similarity, single.matches[j].similarity, 1e-5);
  }
}

TEST_F(SnapIndexTest, WholeSnapIndexHoldsOneItemPerSnap) {
  std::vector<data::Snap> snaps;
  const std::string snap_dir = MakeSnapDir("snaps", 5, &snaps);
  SnapIndexOptions o = Options(snap_dir, (dir_ / "index").string());
  o.boxes = SnapBoxes::kWholeSnap;
  o.embedder = MakeEmbedderRun("emb");
  SnapIndexSummary sum;
  Status st = BuildSnapIndex(o, &sum);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(sum.items, 5);
  EXPECT_EQ(sum.categories, std::vector<std::string>{kWholeSnapCategory});
  auto index = Open(o.output_dir);
  ASSERT_TRUE(index);
  for (const IndexedSnap& s : index->snaps()) {
    ASSERT_EQ(s.items.size(), 1u);
    EXPECT_EQ(s.items[0].box.x1, 64);
    EXPECT_EQ(s.items[0].box.y1, 64);
  }
  // The snap itself, as a product image, is fitted the same way: it finds
  // itself.
  data::GrayImage snap_image;
  ASSERT_TRUE(index->ReadSnapImage(3, &snap_image).ok());
  EXPECT_EQ(snap_image.pixels, snaps[3].pixels);
  SnapQueryResult r;
  ASSERT_TRUE(index->Query(snap_image, {}, &r).ok());
  EXPECT_EQ(r.category_source, "only");
  ASSERT_EQ(r.matches.size(), 5u);
  EXPECT_EQ(r.matches[0].snap_id, snaps[3].id);
  EXPECT_NEAR(r.matches[0].embedding_similarity, 1.0, 1e-4);

  // Whole snaps use no detector and no per-category embedders.
  o.detector = MakeDetector("det");
  o.output_dir = (dir_ / "refused").string();
  st = BuildSnapIndex(o, nullptr);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << st;
  EXPECT_TRUE(NothingWritten(o.output_dir));
}

TEST_F(SnapIndexTest, PerCategoryEmbeddersMustCoverExactlyTheDetectorsCategories) {
  const std::string snap_dir = MakeSnapDir("snaps", 4);
  const std::string a = MakeEmbedderRun("emb16", 16);
  const std::string b = MakeEmbedderRun("emb8", 8);
  SnapIndexOptions o = Options(snap_dir, (dir_ / "index").string());
  o.boxes = SnapBoxes::kGroundTruth;
  o.detector = MakeDetector("det");
  o.category_embedders = {{"tops", a}, {"bottoms", b}, {"bags", a}, {"footwear", b}};
  Status st = BuildSnapIndex(o, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  {
    auto index = Open(o.output_dir);
    ASSERT_TRUE(index);
    EXPECT_TRUE(index->has_detector());
    for (const auto& e : fs::directory_iterator(fs::path(o.output_dir) / "categories")) {
      SearcherOptions so;
      so.index_dir = e.path().string();
      so.threads = 1;
      std::unique_ptr<Searcher> s;
      ASSERT_TRUE(Searcher::Open(so, &s).ok());
      const std::string name = e.path().filename().string();
      const bool is_a = name.find("tops") != std::string::npos || name.find("bags") != std::string::npos;
      EXPECT_EQ(s->manifest().embedding_dim(), is_a ? 16 : 8) << name;
    }
    SnapQueryResult r;
    SnapQueryOptions qo;
    qo.k = 2;
    EXPECT_TRUE(index->Query(SourceImage(0), qo, &r).ok());
  }

  // A category the detector does not have.
  o.output_dir = (dir_ / "hats").string();
  o.category_embedders["hats"] = a;
  st = BuildSnapIndex(o, nullptr);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << st;
  EXPECT_THAT(st.message(), HasSubstr("'hats'"));
  EXPECT_THAT(st.message(), HasSubstr("tops, bottoms, bags, footwear"));
  EXPECT_TRUE(NothingWritten(o.output_dir));
  // A category left without an embedder (no shared one).
  o.category_embedders.erase("hats");
  o.category_embedders.erase("bags");
  o.output_dir = (dir_ / "nobags").string();
  st = BuildSnapIndex(o, nullptr);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << st;
  EXPECT_THAT(st.message(), HasSubstr("no embedder for category 'bags'"));
  EXPECT_TRUE(NothingWritten(o.output_dir));
  // ... which a shared embedder fills.
  o.embedder = a;
  st = BuildSnapIndex(o, nullptr);
  EXPECT_TRUE(st.ok()) << st;
  // A detector of other categories than the annotations name.
  o.detector = MakeDetector("det_other", {"shirts", "shoes"});
  o.category_embedders.clear();
  o.output_dir = (dir_ / "other").string();
  st = BuildSnapIndex(o, nullptr);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << st;
  EXPECT_THAT(st.message(), HasSubstr("does not know"));
  EXPECT_THAT(st.message(), HasSubstr("shirts, shoes"));
  EXPECT_TRUE(NothingWritten(o.output_dir));
}

TEST_F(SnapIndexTest, BadSnapDirectoriesAreRefusedAndLeaveNoIndex) {
  const std::string emb = MakeEmbedderRun("emb");
  auto build = [&](const std::string& snap_dir, const std::string& out) {
    SnapIndexOptions o = Options(snap_dir, (dir_ / out).string());
    o.boxes = SnapBoxes::kGroundTruth;
    o.embedder = emb;
    Status st = BuildSnapIndex(o, nullptr);
    EXPECT_TRUE(NothingWritten(o.output_dir)) << out;
    return st;
  };
  // Missing and empty folders.
  Status st = build((dir_ / "missing").string(), "i1");
  EXPECT_EQ(st.code(), Status::Code::kNotFound) << st;
  fs::create_directories(dir_ / "empty");
  st = build((dir_ / "empty").string(), "i2");
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << st;
  EXPECT_THAT(st.message(), HasSubstr("empty"));
  // A colour image in place of a snap.
  std::vector<data::Snap> snaps;
  const std::string rgb_dir = MakeSnapDir("rgb", 3, &snaps);
  data::RgbImage rgb;
  rgb.rows = rgb.cols = 64;
  rgb.pixels.assign(64 * 64 * 3, 128);
  ASSERT_TRUE(data::WriteRgbPng((fs::path(rgb_dir) / snaps[1].file_name).string(), rgb).ok());
  st = build(rgb_dir, "i3");
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << st;
  EXPECT_THAT(st.message(), HasSubstr(snaps[1].file_name));
  // A snap of another size.
  const std::string size_dir = MakeSnapDir("size", 3);
  data::GrayImage small;
  small.rows = small.cols = 32;
  small.pixels.assign(32 * 32, 10);
  ASSERT_TRUE(data::WriteGrayPng((fs::path(size_dir) / snaps[2].file_name).string(), small).ok());
  st = build(size_dir, "i4");
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << st;
  EXPECT_THAT(st.message(), HasSubstr(snaps[2].file_name));
  // Annotations naming a category that the file does not define.
  const std::string cat_dir = MakeSnapDir("cats", 3);
  {
    const fs::path ann = fs::path(cat_dir) / "annotations.json";
    std::ifstream in(ann);
    nlohmann::json j = nlohmann::json::parse(in);
    j["annotations"][0]["category_id"] = 9;
    std::ofstream(ann) << j.dump();
  }
  st = build(cat_dir, "i5");
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << st;
  EXPECT_THAT(st.message(), HasSubstr("annotations.json"));
  // Annotations whose categories the index's detector does not have.
  const std::string hats_dir = (dir_ / "hats").string();
  std::vector<data::Snap> hats = MakeSnaps(2);
  hats[1].items[0].category = 3;
  ASSERT_TRUE(data::WriteSnapDirectory(hats_dir, hats, {"tops", "bottoms", "bags", "hats"}).ok());
  SnapIndexOptions o = Options(hats_dir, (dir_ / "i6").string());
  o.boxes = SnapBoxes::kDetected;
  o.detector = MakeDetector("det");
  o.embedder = emb;
  st = BuildSnapIndex(o, nullptr);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << st;
  EXPECT_THAT(st.message(), HasSubstr("'hats'"));
  EXPECT_THAT(st.message(), HasSubstr(hats[1].file_name.empty() ? "snap_" : hats[1].file_name));
  EXPECT_TRUE(NothingWritten(o.output_dir));
}

TEST_F(SnapIndexTest, AnOutputThatIsNotASnapIndexIsNeverReplaced) {
  const std::string snap_dir = MakeSnapDir("snaps", 3);
  SnapIndexOptions o = Options(snap_dir, (dir_ / "precious").string());
  o.boxes = SnapBoxes::kGroundTruth;
  o.embedder = MakeEmbedderRun("emb");
  fs::create_directories(o.output_dir);
  std::ofstream(fs::path(o.output_dir) / "notes.txt") << "mine";
  Status st = BuildSnapIndex(o, nullptr);
  EXPECT_EQ(st.code(), Status::Code::kFailedPrecondition) << st;
  EXPECT_TRUE(fs::exists(fs::path(o.output_dir) / "notes.txt"));

  // An index is replaced by a rebuild; a failed rebuild keeps it.
  o.output_dir = (dir_ / "index").string();
  ASSERT_TRUE(BuildSnapIndex(o, nullptr).ok());
  o.boxes = SnapBoxes::kWholeSnap;
  ASSERT_TRUE(BuildSnapIndex(o, nullptr).ok());
  EXPECT_EQ(Open(o.output_dir)->boxes(), SnapBoxes::kWholeSnap);
  o.boxes = SnapBoxes::kGroundTruth;
  o.embedder = (dir_ / "no_such_run").string();
  st = BuildSnapIndex(o, nullptr);
  EXPECT_EQ(st.code(), Status::Code::kNotFound) << st;
  EXPECT_EQ(Open(o.output_dir)->boxes(), SnapBoxes::kWholeSnap);

  // A directory without snap_index.json is not opened.
  SnapIndexOpenOptions oo;
  oo.index_dir = (dir_ / "precious").string();
  std::unique_ptr<SnapIndex> index;
  st = SnapIndex::Open(oo, &index);
  EXPECT_EQ(st.code(), Status::Code::kNotFound) << st;
  EXPECT_THAT(st.message(), HasSubstr("not a snap index"));
}

TEST_F(SnapIndexTest, QueriesCheckTheirArguments) {
  const SnapIndexOptions o = BuildTruthIndex(3);
  ASSERT_FALSE(o.output_dir.empty());
  auto index = Open(o.output_dir);
  ASSERT_TRUE(index);
  SnapQueryResult r;
  SnapQueryOptions qo;
  qo.k = 0;
  EXPECT_EQ(index->Query(SourceImage(0), qo, &r).code(), Status::Code::kInvalidArgument);
  qo.k = 3;
  qo.category = "hats";
  Status st = index->Query(SourceImage(0), qo, &r);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("'hats'"));
  qo.category.clear();
  EXPECT_EQ(index->Query(data::GrayImage{}, qo, &r).code(), Status::Code::kInvalidArgument);
  int c = 0;
  float s = 0;
  EXPECT_EQ(index->PredictCategory(SourceImage(0), &c, &s).code(), Status::Code::kFailedPrecondition);
}

TEST_F(SnapIndexTest, ItemBoundsAndProductTemplateFindTheProductsPixels) {
  data::GrayImage g;
  g.rows = 10;
  g.cols = 12;
  g.pixels.assign(120, 20);  // at the threshold: background
  g.pixels[2 * 12 + 3] = 21;
  g.pixels[6 * 12 + 8] = 200;
  const data::SnapBox b = ItemBounds(g);
  EXPECT_EQ(b.x0, 3);
  EXPECT_EQ(b.y0, 2);
  EXPECT_EQ(b.x1, 9);
  EXPECT_EQ(b.y1, 7);
  // Nothing above the threshold: the whole image.
  g.pixels.assign(120, 5);
  const data::SnapBox w = ItemBounds(g);
  EXPECT_EQ(w.x0, 0);
  EXPECT_EQ(w.y0, 0);
  EXPECT_EQ(w.x1, 12);
  EXPECT_EQ(w.y1, 10);
  // A product's template is the square crop of its tight box.
  const data::GrayImage src = SourceImage(0);
  const data::GrayImage t = ProductTemplate(src);
  EXPECT_EQ(t.rows, kItemTemplateSide);
  EXPECT_EQ(t.cols, kItemTemplateSide);
  const data::GrayImage direct = CropSquare(src.pixels.data(), src.rows, src.cols, ItemBounds(src), kItemTemplateSide);
  EXPECT_EQ(t.pixels, direct.pixels);
}

TEST_F(SnapIndexTest, TemplateSimilarityIgnoresBrightnessAndBackgroundButNotTheImage) {
  // Each test image placed alone on a textured background, 1.4x its size
  // and 0.75x as bright, and cut out by its tight box, as an item template
  // of a snap: it matches its own product template almost perfectly and
  // other images of its class clearly less.
  auto item_template = [&](int64_t index) {
    const data::GrayImage src = SourceImage(index);
    const int side = 64;
    std::vector<uint8_t> canvas(side * side);
    for (int y = 0; y < side; ++y) {
      for (int x = 0; x < side; ++x) canvas[y * side + x] = static_cast<uint8_t>(40 + ((x / 3 + y / 5) % 2) * 50);
    }
    const data::GrayImage big = CropSquare(src.pixels.data(), 28, 28, data::SnapBox{0, 0, 28, 28}, 39);
    for (int y = 0; y < 39; ++y) {
      for (int x = 0; x < 39; ++x) {
        const uint8_t v = big.pixels[y * 39 + x];
        if (v > kItemMaskThreshold) canvas[(y + 10) * side + x + 12] = static_cast<uint8_t>(v * 0.75);
      }
    }
    data::SnapBox box = ItemBounds(big);  // the tight box, moved to where the item is
    box.x0 += 12;
    box.x1 += 12;
    box.y0 += 10;
    box.y1 += 10;
    return CropSquare(canvas.data(), side, side, box, kItemTemplateSide);
  };
  int same = 0, pairs = 0;
  double own = 0, other = 0;
  for (int64_t i = 0; i < 40; ++i) {
    const data::GrayImage product = ProductTemplate(SourceImage(i));
    const float self = TemplateSimilarity(product, item_template(i));
    // Faint pixels of the product (just over the threshold) show the
    // background in the snap (the generator draws item pixels over the
    // threshold only, after scaling): not every image reaches 0.9.
    EXPECT_GT(self, 0.8f) << "image " << i;
    own += self;
    // The next image of the same class.
    for (int64_t j = i + 1; j < test_split_->size; ++j) {
      if (test_split_->labels[static_cast<size_t>(j)] != test_split_->labels[static_cast<size_t>(i)]) continue;
      const float o = TemplateSimilarity(product, item_template(j));
      other += o;
      same += self > o ? 1 : 0;
      ++pairs;
      break;
    }
  }
  std::printf("template similarity: own image %.3f, another of its class %.3f (mean); own higher in %d of %d\n",
              own / 40, other / pairs, same, pairs);
  EXPECT_GT(own / 40, 0.9);
  EXPECT_GE(same, pairs - 1);
  EXPECT_GT(own / 40 - other / pairs, 0.1);
  // A uniform item, a uniform product and wrong sizes score 0.
  data::GrayImage flat;
  flat.rows = flat.cols = kItemTemplateSide;
  flat.pixels.assign(kItemTemplatePixels, 90);
  const data::GrayImage product = ProductTemplate(SourceImage(0));
  EXPECT_EQ(TemplateSimilarity(product, flat), 0.f);
  EXPECT_EQ(TemplateSimilarity(flat, item_template(0)), 0.f);
  EXPECT_EQ(TemplateSimilarity(product, SourceImage(0)), 0.f);  // 28x28, not a template
}

TEST_F(SnapIndexTest, TemplateReRankingFindsTheVeryItem) {
  std::vector<data::Snap> snaps;
  const std::string snap_dir = MakeSnapDir("snaps", 24, &snaps);
  SnapIndexOptions o = Options(snap_dir, (dir_ / "index").string());
  o.boxes = SnapBoxes::kGroundTruth;
  o.embedder = TrainedEmbedderRun();
  ASSERT_EQ(o.pixel_weight, 0.4f);
  ASSERT_TRUE(BuildSnapIndex(o, nullptr).ok());
  auto index = Open(o.output_dir);
  ASSERT_TRUE(index);
  EXPECT_EQ(index->pixel_weight(), 0.4f);
  {
    std::ifstream in(fs::path(o.output_dir) / "snap_index.json");
    const nlohmann::json root = nlohmann::json::parse(in);
    EXPECT_EQ(root.at("pixel_weight").get<float>(), 0.4f);
    EXPECT_EQ(root.at("pixel_descriptor").at("side").get<int>(), kItemTemplateSide);
    EXPECT_EQ(root.at("pixel_descriptor").at("file").get<std::string>(), kItemTemplateFile);
  }
  // Clean source images as queries, by the embedding alone and re-ranked.
  auto recall = [&](float weight, float bonus, int k) {
    int hits = 0, queries = 0;
    for (size_t i = 0; i < snaps.size(); ++i) {
      for (const data::SnapItem& it : snaps[i].items) {
        SnapQueryOptions qo;
        qo.k = k;
        qo.category = Coarse()[static_cast<size_t>(it.category)];
        qo.pixel_weight = weight;
        qo.instance_weight = bonus;
        SnapQueryResult r;
        Status st = index->Query(SourceImage(it.source_index), qo, &r);
        EXPECT_TRUE(st.ok()) << st;
        const float w = weight < 0 ? index->pixel_weight() : weight;
        for (size_t j = 0; j < r.matches.size(); ++j) {
          const SnapMatch& m = r.matches[j];
          // The linear score, plus the instance bonus for the items near the
          // best template match.
          const float t = m.pixel_similarity;
          const float linear = (1 - w) * m.embedding_similarity + w * t;
          const float with_bonus =
              linear + bonus * std::clamp((t - qo.instance_threshold) / (1 - qo.instance_threshold), 0.f, 1.f);
          EXPECT_TRUE(std::abs(m.similarity - linear) < 1e-5 || std::abs(m.similarity - with_bonus) < 1e-5)
              << m.similarity << " is neither " << linear << " nor " << with_bonus;
          if (weight == 0 && bonus == 0) {
            EXPECT_EQ(t, 0.f);  // not computed
          }
          if (j > 0) {
            EXPECT_LE(m.similarity, r.matches[j - 1].similarity);
          }
          hits += m.snap_id == snaps[i].id ? 1 : 0;
        }
        ++queries;
      }
    }
    return static_cast<double>(hits) / queries;
  };
  const float bonus = SnapQueryOptions().instance_weight;
  const double embedding1 = recall(0, 0, 1), templates1 = recall(-1, bonus, 1), linear1 = recall(0.5f, 0, 1);
  const double embedding3 = recall(0, 0, 3), templates3 = recall(-1, bonus, 3);
  std::printf("instance recall@1 %.3f -> %.3f (linear term alone, weight 0.5: %.3f), recall@3 %.3f -> %.3f with "
              "item templates\n",
              embedding1, templates1, linear1, embedding3, templates3);
  // The templates tell instances apart where the class-trained embedder
  // cannot.
  EXPECT_GE(templates1, embedding1 + 0.2);
  EXPECT_GE(templates1, 0.85);
  EXPECT_GE(templates3, embedding3);
  EXPECT_GE(templates3, 0.9);
  EXPECT_GE(linear1, embedding1 + 0.1);

  // Weights outside their ranges are refused, when building and when
  // querying.
  SnapQueryOptions qo;
  qo.k = 3;
  for (float bad : {-0.5f, 1.5f, std::nanf("")}) {
    qo.pixel_weight = bad;
    SnapQueryResult r;
    Status st = index->Query(SourceImage(0), qo, &r);
    EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << bad;
    EXPECT_THAT(st.message(), HasSubstr("pixel_weight"));
    qo.pixel_weight = -1;
    qo.instance_weight = bad;
    st = index->Query(SourceImage(0), qo, &r);
    EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << bad;
    EXPECT_THAT(st.message(), HasSubstr("instance_weight"));
    qo.instance_weight = 0.5f;
    qo.instance_threshold = bad;
    st = index->Query(SourceImage(0), qo, &r);
    EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << bad;
    EXPECT_THAT(st.message(), HasSubstr("instance_threshold"));
    qo.instance_threshold = 0.7f;
    SnapIndexOptions b = o;
    b.pixel_weight = bad;
    b.output_dir = (dir_ / "bad_weight").string();
    st = BuildSnapIndex(b, nullptr);
    EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << bad;
    EXPECT_THAT(st.message(), HasSubstr("pixel_weight"));
    EXPECT_TRUE(NothingWritten(b.output_dir));
  }
  qo.instance_threshold = 1;
  SnapQueryResult r;
  EXPECT_EQ(index->Query(SourceImage(0), qo, &r).code(), Status::Code::kInvalidArgument);
  qo.instance_threshold = 0.7f;
  qo.instance_margin = -0.1f;
  EXPECT_EQ(index->Query(SourceImage(0), qo, &r).code(), Status::Code::kInvalidArgument);
  qo.instance_margin = 0.05f;
  qo.rerank_depth = -1;
  EXPECT_EQ(index->Query(SourceImage(0), qo, &r).code(), Status::Code::kInvalidArgument);
}

TEST_F(SnapIndexTest, AnIndexWithoutTemplatesOpensAndRanksByTheEmbedding) {
  // An index written before item templates: snap_index.json names the old
  // 14x14 descriptors (no kind) and there is no templates.u8.
  const SnapIndexOptions o = BuildTruthIndex(6);
  ASSERT_FALSE(o.output_dir.empty());
  const fs::path json_path = fs::path(o.output_dir) / "snap_index.json";
  nlohmann::ordered_json root;
  {
    std::ifstream in(json_path);
    root = nlohmann::ordered_json::parse(in);
  }
  root["pixel_weight"] = 0.5;
  root["pixel_descriptor"] = {{"file", "pixels.f32"}, {"side", 14}, {"mean_subtracted", true}};
  {
    std::ofstream out(json_path, std::ios::trunc);
    out << root.dump(2);
  }
  for (const auto& e : fs::directory_iterator(fs::path(o.output_dir) / "categories")) {
    fs::remove(e.path() / kItemTemplateFile);
  }
  auto index = Open(o.output_dir);
  ASSERT_TRUE(index);
  EXPECT_EQ(index->pixel_weight(), 0.f);
  SnapQueryOptions qo;
  qo.k = 2;
  qo.category = "tops";
  SnapQueryResult r;
  Status st = index->Query(SourceImage(0), qo, &r);  // the instance bonus needs templates
  EXPECT_EQ(st.code(), Status::Code::kFailedPrecondition) << st;
  EXPECT_THAT(st.message(), HasSubstr("build it again"));
  qo.instance_weight = 0;
  st = index->Query(SourceImage(0), qo, &r);
  EXPECT_TRUE(st.ok()) << st;
  EXPECT_FALSE(r.matches.empty());
}

TEST_F(SnapIndexTest, DamagedTemplatesAreReportedAsCorruption) {
  const SnapIndexOptions o = BuildTruthIndex(6);
  ASSERT_FALSE(o.output_dir.empty());
  ASSERT_TRUE(Open(o.output_dir));
  fs::path file;
  for (const auto& e : fs::directory_iterator(fs::path(o.output_dir) / "categories")) {
    if (fs::exists(e.path() / kItemTemplateFile)) file = e.path() / kItemTemplateFile;
  }
  ASSERT_FALSE(file.empty());
  const auto size = fs::file_size(file);
  SnapIndexOpenOptions oo;
  oo.index_dir = o.output_dir;
  oo.threads = 1;
  std::unique_ptr<SnapIndex> index;
  // Truncated.
  fs::resize_file(file, size - 4);
  Status st = SnapIndex::Open(oo, &index);
  EXPECT_EQ(st.code(), Status::Code::kCorruption) << st;
  EXPECT_THAT(st.message(), HasSubstr(file.string()));
  // The right size, a damaged header.
  fs::resize_file(file, size);
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.write("junk", 4);
  }
  st = SnapIndex::Open(oo, &index);
  EXPECT_EQ(st.code(), Status::Code::kCorruption) << st;
  EXPECT_THAT(st.message(), HasSubstr(file.string()));
  // Missing.
  fs::remove(file);
  st = SnapIndex::Open(oo, &index);
  EXPECT_EQ(st.code(), Status::Code::kCorruption) << st;
  EXPECT_THAT(st.message(), HasSubstr(file.string()));
}

TEST_F(SnapIndexTest, PictureShowsTheProductAndMarksTheMatchedBox) {
  data::GrayImage product;
  product.rows = product.cols = 28;
  product.pixels.assign(28 * 28, 77);
  IndexedSnap snap;
  snap.items.push_back({data::SnapBox{4, 4, 20, 20}, 0, 0.9f});
  snap.items.push_back({data::SnapBox{30, 30, 50, 60}, 1, 0.8f});
  data::GrayImage image;
  image.rows = image.cols = 64;
  image.pixels.assign(64 * 64, 10);
  SnapQueryResult result;
  SnapMatch m;
  m.item_id = 5 * kMaxItemsPerSnap + 1;  // the second item
  m.item = snap.items[1];
  m.similarity = 0.5f;
  result.matches.push_back(m);
  SnapPictureOptions po;
  data::RgbImage pic;
  Status st = DrawSnapResults(product, result, {&snap}, {image}, po, &pic);
  ASSERT_TRUE(st.ok()) << st;
  auto px = [&](int y, int x) {
    const uint8_t* p = &pic.pixels[(static_cast<size_t>(y) * pic.cols + x) * 3];
    return std::vector<int>{p[0], p[1], p[2]};
  };
  const int gap = po.gap;
  // The product, enlarged to the snaps' height, at the left.
  EXPECT_EQ(px(gap + 32, gap + 32), (std::vector<int>{77, 77, 77}));
  const int x0 = gap + 64 + 2 * gap, y0 = gap;
  EXPECT_EQ(pic.cols, x0 + 64 + gap);
  // The matched box in the match colour, the other in the other colour, the
  // snap's pixels elsewhere.
  const std::vector<int> green{po.match_rgb[0], po.match_rgb[1], po.match_rgb[2]};
  const std::vector<int> orange{po.other_rgb[0], po.other_rgb[1], po.other_rgb[2]};
  EXPECT_EQ(px(y0 + 30, x0 + 40), green);
  EXPECT_EQ(px(y0 + 31, x0 + 40), green);  // two pixels wide
  EXPECT_EQ(px(y0 + 59, x0 + 49), green);
  EXPECT_EQ(px(y0 + 4, x0 + 10), orange);
  EXPECT_EQ(px(y0 + 40, x0 + 40), (std::vector<int>{10, 10, 10}));
  // The similarity bar: half the tile's width.
  const int bar_y = y0 + 64 + 2;
  EXPECT_EQ(px(bar_y, x0 + 10), green);
  EXPECT_NE(px(bar_y, x0 + 50), green);
  // Mismatched inputs are refused.
  EXPECT_EQ(DrawSnapResults(product, result, {}, {}, po, &pic).code(), Status::Code::kInvalidArgument);
}

}  // namespace
}  // namespace dtrain::indexer
