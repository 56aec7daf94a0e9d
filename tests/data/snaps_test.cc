#include "dtrain/data/snaps.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <png.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "dtrain/common/detection_metrics.h"
#include "dtrain/data/image_io.h"
#include "loaded_split_test.h"
#include "temp_dir_test.h"

namespace dtrain::data {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::HasSubstr;

// The first 3000 train images and the whole test split.
const Dataset& Split(data::Split split) { return testing::LoadedSplit(split, split == Split::kTrain ? 3000 : 0); }

SnapGenerator Generator(const SnapOptions& options, data::Split split = Split::kTrain) {
  SnapGenerator g;
  const Status s = SnapGenerator::Create(Split(split), options, &g);
  EXPECT_TRUE(s.ok()) << s;
  return g;
}

DetBox ToDet(const SnapBox& b) { return DetBox{b.x0, b.y0, b.x1, b.y1}; }

uint64_t Fnv1a(const void* data, size_t n, uint64_t h = 1469598103934665603ull) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

// A digest of everything a snap holds.
uint64_t Digest(const Snap& s) {
  uint64_t h = Fnv1a(s.pixels.data(), s.pixels.size());
  for (const SnapItem& it : s.items) {
    const float box[4] = {it.box.x0, it.box.y0, it.box.x1, it.box.y1};
    const int64_t ids[3] = {it.category, it.fine_class, it.source_index};
    h = Fnv1a(box, sizeof box, h);
    h = Fnv1a(ids, sizeof ids, h);
  }
  return h;
}

void ExpectSameSnap(const Snap& a, const Snap& b) {
  EXPECT_EQ(a.id, b.id);
  EXPECT_EQ(a.rows, b.rows);
  EXPECT_EQ(a.cols, b.cols);
  EXPECT_TRUE(a.pixels == b.pixels) << "snap " << a.id << ": pixels differ";
  ASSERT_EQ(a.items.size(), b.items.size()) << "snap " << a.id;
  for (size_t i = 0; i < a.items.size(); ++i) {
    const SnapItem& x = a.items[i];
    const SnapItem& y = b.items[i];
    EXPECT_EQ(x.box.x0, y.box.x0);
    EXPECT_EQ(x.box.y0, y.box.y0);
    EXPECT_EQ(x.box.x1, y.box.x1);
    EXPECT_EQ(x.box.y1, y.box.y1);
    EXPECT_EQ(x.category, y.category);
    EXPECT_EQ(x.fine_class, y.fine_class);
    EXPECT_EQ(x.source_index, y.source_index);
  }
}

TEST(SnapCategoriesTest, CoarseCategoriesGroupTheTenLabels) {
  EXPECT_STREQ(CoarseCategoryNames()[0], "tops");
  EXPECT_STREQ(CoarseCategoryNames()[1], "bottoms");
  EXPECT_STREQ(CoarseCategoryNames()[2], "bags");
  EXPECT_STREQ(CoarseCategoryNames()[3], "footwear");
  // 0 T-shirt/top, 2 Pullover, 3 Dress, 4 Coat, 6 Shirt are tops; 1 Trouser
  // bottoms; 8 Bag bags; 5 Sandal, 7 Sneaker, 9 Ankle boot footwear.
  const int expected[10] = {0, 1, 0, 0, 0, 3, 0, 3, 2, 3};
  for (int c = 0; c < 10; ++c) EXPECT_EQ(CoarseCategory(c), expected[c]) << ClassNames()[c];
}

TEST(SnapGeneratorTest, SameKeyGivesTheSameSnap) {
  SnapOptions o;
  const SnapGenerator a = Generator(o);
  const SnapGenerator b = Generator(o);
  for (int64_t key : {0, 1, 17, 123456789}) {
    const Snap x = a.Generate(key);
    EXPECT_EQ(x.id, key);
    ExpectSameSnap(x, a.Generate(key));
    ExpectSameSnap(x, b.Generate(key));
  }
}

TEST(SnapGeneratorTest, DifferentKeysAndSeedsGiveDifferentSnaps) {
  SnapOptions o;
  const SnapGenerator g = Generator(o);
  std::set<uint64_t> digests;
  for (int64_t key = 0; key < 50; ++key) digests.insert(Digest(g.Generate(key)));
  EXPECT_EQ(digests.size(), 50u);
  o.seed = 2;
  const SnapGenerator other = Generator(o);
  EXPECT_NE(Digest(other.Generate(0)), Digest(g.Generate(0)));
}

// The snap of one key pinned to its digest: the generator uses no std::
// distribution and no platform-dependent maths, so this value is the same on
// every machine. A deliberate change of the algorithm updates it.
TEST(SnapGeneratorTest, SnapIsPinnedAcrossMachines) {
  const SnapGenerator g = Generator(SnapOptions{});
  EXPECT_EQ(Digest(g.Generate(42)), 0xdeef5fb29e927cf0ull) << std::hex << Digest(g.Generate(42));
}

TEST(SnapGeneratorTest, SnapsHoldItemsWithinTheCanvasAndOptions) {
  SnapOptions o;
  o.canvas = 96;
  o.min_items = 2;
  o.max_items = 5;
  o.min_scale = 0.8f;
  o.max_scale = 1.4f;
  const SnapGenerator g = Generator(o);
  const Dataset& ds = Split(Split::kTrain);
  std::vector<int> per_count(o.max_items + 1, 0);
  std::vector<int> per_category(4, 0);
  const int n = 300;
  for (int64_t key = 0; key < n; ++key) {
    const Snap s = g.Generate(key);
    ASSERT_EQ(s.rows, 96);
    ASSERT_EQ(s.cols, 96);
    ASSERT_EQ(s.pixels.size(), 96u * 96u);
    EXPECT_TRUE(s.file_name.empty());
    ASSERT_GE(s.items.size(), 1u) << "snap " << key;
    ASSERT_LE(s.items.size(), static_cast<size_t>(o.max_items)) << "snap " << key;
    ++per_count[s.items.size()];
    for (const SnapItem& it : s.items) {
      // Inside the canvas, not empty, and no larger than the largest scaled item.
      EXPECT_GE(it.box.x0, 0);
      EXPECT_GE(it.box.y0, 0);
      EXPECT_LE(it.box.x1, 96);
      EXPECT_LE(it.box.y1, 96);
      EXPECT_GT(it.box.width(), 0);
      EXPECT_GT(it.box.height(), 0);
      EXPECT_LE(it.box.width(), std::lround(28 * 1.4));
      EXPECT_LE(it.box.height(), std::lround(28 * 1.4));
      EXPECT_EQ(it.box.x0, std::floor(it.box.x0));  // pixel coordinates
      ASSERT_GE(it.source_index, 0);
      ASSERT_LT(it.source_index, ds.size);
      EXPECT_EQ(it.fine_class, ds.labels[static_cast<size_t>(it.source_index)]);
      EXPECT_EQ(it.category, CoarseCategory(it.fine_class));
      ++per_category[static_cast<size_t>(it.category)];
    }
  }
  // The count is uniform in [min_items, max_items]: each appears (placing
  // fewer is the rare fallback of a crowded canvas).
  int below_min = 0;
  for (int c = 1; c < o.min_items; ++c) below_min += per_count[c];
  EXPECT_LE(below_min, n / 20);
  for (int c = o.min_items; c <= o.max_items; ++c) EXPECT_GT(per_count[c], n / 8) << c << " items";
  // Tops are half of Fashion-MNIST's classes, bottoms and bags a tenth each.
  for (int c = 0; c < 4; ++c) EXPECT_GT(per_category[c], 0) << CoarseCategoryNames()[c];
  EXPECT_GT(per_category[0], per_category[1] * 3);
}

TEST(SnapGeneratorTest, ItemsAreVisibleOverTheBackground) {
  const SnapGenerator g = Generator(SnapOptions{});
  const Dataset& ds = Split(Split::kTrain);
  for (int64_t key = 0; key < 300; ++key) {
    const Snap s = g.Generate(key);
    for (const SnapItem& it : s.items) {
      // The box holds the item's bright pixels: its brightest pixel keeps at
      // least half of the source's (brightness jitter >= 0.7, blur of
      // downscaling, up to 40% of the item hidden by later ones).
      const uint8_t* src = ds.image(it.source_index);
      const int src_max = *std::max_element(src, src + 28 * 28);
      int box_max = 0;
      for (int y = static_cast<int>(it.box.y0); y < static_cast<int>(it.box.y1); ++y) {
        for (int x = static_cast<int>(it.box.x0); x < static_cast<int>(it.box.x1); ++x) {
          box_max = std::max<int>(box_max, s.pixels[static_cast<size_t>(y) * s.cols + x]);
        }
      }
      EXPECT_GE(box_max, static_cast<int>(0.5 * src_max)) << "snap " << key;
    }
    // The background stays dim: the median pixel is dark.
    std::vector<uint8_t> sorted = s.pixels;
    std::nth_element(sorted.begin(), sorted.begin() + sorted.size() / 2, sorted.end());
    EXPECT_LT(sorted[sorted.size() / 2], 130) << "snap " << key;
  }
}

TEST(SnapGeneratorTest, MaxOverlapLimitsThePlacedItems) {
  // No overlap allowed: the squares are disjoint, so are the boxes inside them.
  SnapOptions o;
  o.max_overlap = 0.0f;
  const SnapGenerator g = Generator(o);
  for (int64_t key = 0; key < 200; ++key) {
    const Snap s = g.Generate(key);
    for (size_t i = 0; i < s.items.size(); ++i) {
      for (size_t j = 0; j < i; ++j) {
        EXPECT_EQ(BoxIoU(ToDet(s.items[i].box), ToDet(s.items[j].box)), 0.0) << "snap " << key;
      }
    }
  }
  // The default 0.2: boxes overlap sometimes, but never by much.
  const SnapGenerator d = Generator(SnapOptions{});
  int overlapping = 0;
  for (int64_t key = 0; key < 200; ++key) {
    const Snap s = d.Generate(key);
    for (size_t i = 0; i < s.items.size(); ++i) {
      for (size_t j = 0; j < i; ++j) {
        const double iou = BoxIoU(ToDet(s.items[i].box), ToDet(s.items[j].box));
        overlapping += iou > 0;
        EXPECT_LT(iou, 0.5) << "snap " << key;
      }
    }
  }
  EXPECT_GT(overlapping, 0);
}

TEST(SnapGeneratorTest, TestSplitSnapsDrawOnlyTestImages) {
  const Dataset& test = Split(Split::kTest);
  ASSERT_EQ(test.size, 10000);
  const SnapGenerator g = Generator(SnapOptions{}, Split::kTest);
  int64_t largest = 0;
  for (int64_t key = 0; key < 200; ++key) {
    for (const SnapItem& it : g.Generate(key).items) {
      ASSERT_GE(it.source_index, 0);
      ASSERT_LT(it.source_index, 10000);
      largest = std::max(largest, it.source_index);
      EXPECT_EQ(it.fine_class, test.labels[static_cast<size_t>(it.source_index)]);
    }
  }
  // Items come from the whole split, not only its start.
  EXPECT_GT(largest, 9000);
}

TEST(SnapGeneratorTest, BadOptionsAreRefusedNamingTheOption) {
  const Dataset& ds = Split(Split::kTrain);
  struct Case {
    std::function<void(SnapOptions*)> change;
    std::string message;
  };
  const std::vector<Case> cases = {
      {[](SnapOptions* o) { o->canvas = 16; }, "canvas"},
      {[](SnapOptions* o) { o->min_items = 0; }, "min_items"},
      {[](SnapOptions* o) { o->min_items = 4, o->max_items = 3; }, "min_items (4) must not exceed max_items (3)"},
      {[](SnapOptions* o) { o->min_scale = 0; }, "min_scale"},
      {[](SnapOptions* o) { o->min_scale = 1.2f, o->max_scale = 1.0f; }, "max_scale"},
      {[](SnapOptions* o) { o->canvas = 40, o->max_scale = 1.6f; }, "larger than the canvas of 40 px"},
      {[](SnapOptions* o) { o->max_overlap = 1.5f; }, "max_overlap"},
      {[](SnapOptions* o) { o->max_overlap = -0.1f; }, "max_overlap"},
  };
  for (const Case& c : cases) {
    SnapOptions o;
    c.change(&o);
    SnapGenerator g;
    const Status s = SnapGenerator::Create(ds, o, &g);
    EXPECT_EQ(s.code(), Status::Code::kInvalidArgument) << c.message;
    EXPECT_THAT(s.message(), HasSubstr(c.message));
  }
  SnapGenerator g;
  EXPECT_EQ(SnapGenerator::Create(Dataset{}, SnapOptions{}, &g).code(), Status::Code::kInvalidArgument);
}

// ---- snap directories ---------------------------------------------------------------

class SnapDirectoryTest : public testing::TempDirTest {
 protected:
  std::vector<Snap> Generated(int n) {
    const SnapGenerator g = Generator(SnapOptions{});
    std::vector<Snap> snaps;
    for (int k = 1; k <= n; ++k) snaps.push_back(g.Generate(k * 10));
    return snaps;
  }

  std::vector<std::string> Categories() {
    return std::vector<std::string>(CoarseCategoryNames().begin(), CoarseCategoryNames().end());
  }

  // Writes three snaps, then lets `edit` change annotations.json.
  void WriteThenEdit(const std::function<void(json*)>& edit) {
    ASSERT_TRUE(WriteSnapDirectory(dir_, Generated(3), Categories()).ok());
    const std::string path = dir_ + "/annotations.json";
    std::ifstream in(path);
    json j = json::parse(in);
    edit(&j);
    std::ofstream(path) << j.dump();
  }

  Status Read(std::vector<Snap>* snaps = nullptr) {
    std::vector<Snap> s;
    std::vector<std::string> c;
    return ReadSnapDirectory(dir_, true, snaps ? snaps : &s, &c);
  }
};

TEST_F(SnapDirectoryTest, WrittenSnapsReadBackExactly) {
  const std::vector<Snap> snaps = Generated(5);
  ASSERT_TRUE(WriteSnapDirectory(dir_, snaps, Categories()).ok());
  EXPECT_TRUE(fs::exists(dir_ + "/snap_10.png"));
  EXPECT_FALSE(fs::exists(dir_ + "/annotations.json.tmp"));

  std::vector<Snap> back;
  std::vector<std::string> categories;
  const Status s = ReadSnapDirectory(dir_, true, &back, &categories);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(categories, Categories());
  ASSERT_EQ(back.size(), snaps.size());
  for (size_t i = 0; i < snaps.size(); ++i) {
    EXPECT_EQ(back[i].file_name, "snap_" + std::to_string(snaps[i].id) + ".png");
    ExpectSameSnap(snaps[i], back[i]);  // PNG is lossless, boxes are whole pixels
  }

  // Without pixels: the annotations and sizes only.
  ASSERT_TRUE(ReadSnapDirectory(dir_, false, &back, &categories).ok());
  ASSERT_EQ(back.size(), snaps.size());
  EXPECT_TRUE(back[0].pixels.empty());
  EXPECT_EQ(back[0].rows, 128);
  EXPECT_EQ(back[0].items.size(), snaps[0].items.size());
}

TEST_F(SnapDirectoryTest, AnnotationsAreCoco) {
  std::vector<Snap> snaps = Generated(2);
  snaps[1].file_name = "street.png";
  ASSERT_TRUE(WriteSnapDirectory(dir_, snaps, Categories()).ok());
  std::ifstream in(dir_ + "/annotations.json");
  const json j = json::parse(in);
  ASSERT_EQ(j["images"].size(), 2u);
  EXPECT_EQ(j["images"][1]["file_name"], "street.png");
  EXPECT_EQ(j["images"][0]["width"], 128);
  EXPECT_EQ(j["images"][0]["height"], 128);
  ASSERT_EQ(j["categories"].size(), 4u);
  EXPECT_EQ(j["categories"][0]["id"], 1);
  EXPECT_EQ(j["categories"][0]["name"], "tops");
  const json& a = j["annotations"][0];
  const SnapItem& it = snaps[0].items[0];
  EXPECT_EQ(a["image_id"], snaps[0].id);
  EXPECT_EQ(a["category_id"], it.category + 1);  // 1-based in the file
  EXPECT_EQ(a["bbox"][0].get<double>(), it.box.x0);
  EXPECT_EQ(a["bbox"][2].get<double>(), it.box.width());
  EXPECT_EQ(a["area"].get<double>(), it.box.width() * it.box.height());
  EXPECT_EQ(a["iscrowd"], 0);
  EXPECT_EQ(a["fine_class"], it.fine_class);
  EXPECT_EQ(a["source_index"], it.source_index);
  EXPECT_EQ(j["annotations"].size(), snaps[0].items.size() + snaps[1].items.size());
}

TEST_F(SnapDirectoryTest, InvalidSnapsWriteNothing) {
  std::vector<Snap> snaps = Generated(2);
  snaps[1].items[0].box.x1 = 500;
  const std::string out = dir_ + "/out";
  Status s = WriteSnapDirectory(out, snaps, Categories());
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("snap 20"));
  EXPECT_FALSE(fs::exists(out));
  snaps = Generated(2);
  snaps[1].id = snaps[0].id;
  EXPECT_THAT(WriteSnapDirectory(out, snaps, Categories()).message(), HasSubstr("used twice"));
  snaps = Generated(1);
  snaps[0].items[0].category = 4;
  EXPECT_THAT(WriteSnapDirectory(out, snaps, Categories()).message(), HasSubstr("category 4"));
  EXPECT_FALSE(fs::exists(out));
}

TEST_F(SnapDirectoryTest, WriterStreamsSnapsAndWritesAnnotationsLast) {
  const std::vector<Snap> snaps = Generated(3);
  ASSERT_TRUE(WriteSnapDirectory(dir_, Generated(1), Categories()).ok());
  SnapDirectoryWriter w;
  ASSERT_TRUE(SnapDirectoryWriter::Open(dir_, Categories(), &w).ok());
  // The older annotations.json is gone while the images are replaced.
  EXPECT_FALSE(fs::exists(dir_ + "/annotations.json"));
  EXPECT_EQ(w.Finish().code(), Status::Code::kFailedPrecondition);
  for (const Snap& s : snaps) ASSERT_TRUE(w.Add(s).ok());
  EXPECT_EQ(w.snaps(), 3);
  EXPECT_THAT(w.Add(snaps[1]).message(), HasSubstr("snap id 20 is used twice"));
  Snap small = Generated(1)[0];
  small.id = 99;
  small.rows = 64;
  small.pixels.resize(64 * 128);
  EXPECT_THAT(w.Add(small).message(), HasSubstr("the snaps of a directory are all of one size"));
  EXPECT_FALSE(fs::exists(dir_ + "/annotations.json"));
  EXPECT_EQ(Read().code(), Status::Code::kNotFound);
  ASSERT_TRUE(w.Finish().ok());
  std::vector<Snap> back;
  ASSERT_TRUE(Read(&back).ok());
  ASSERT_EQ(back.size(), 3u);
  for (size_t i = 0; i < 3; ++i) ExpectSameSnap(snaps[i], back[i]);
}

TEST_F(SnapDirectoryTest, MissingOrEmptyDirectoryIsReported) {
  std::vector<Snap> snaps;
  std::vector<std::string> categories;
  Status s = ReadSnapDirectory(dir_ + "/none", true, &snaps, &categories);
  EXPECT_EQ(s.code(), Status::Code::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr(dir_ + "/none"));

  s = ReadSnapDirectory(dir_, true, &snaps, &categories);
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("is empty"));

  // Images without annotations.json.
  ASSERT_TRUE(WriteGrayPng(dir_ + "/a.png", GrayImage{128, 128, std::vector<uint8_t>(128 * 128, 0)}).ok());
  s = ReadSnapDirectory(dir_, true, &snaps, &categories);
  EXPECT_EQ(s.code(), Status::Code::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr(dir_ + "/annotations.json does not exist"));
  EXPECT_TRUE(snaps.empty());
}

TEST_F(SnapDirectoryTest, MissingImageIsNotFound) {
  ASSERT_TRUE(WriteSnapDirectory(dir_, Generated(2), Categories()).ok());
  fs::remove(dir_ + "/snap_20.png");
  const Status s = Read();
  EXPECT_EQ(s.code(), Status::Code::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("snap_20.png"));
}

TEST_F(SnapDirectoryTest, ImageOfAnotherSizeIsRefused) {
  ASSERT_TRUE(WriteSnapDirectory(dir_, Generated(2), Categories()).ok());
  ASSERT_TRUE(WriteGrayPng(dir_ + "/snap_20.png", GrayImage{64, 64, std::vector<uint8_t>(64 * 64, 9)}).ok());
  const Status s = Read();
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("snap_20.png: the image is 64x64 but annotations.json says 128x128"));
}

TEST_F(SnapDirectoryTest, ColourAnd16BitImagesAreRefused) {
  ASSERT_TRUE(WriteSnapDirectory(dir_, Generated(2), Categories()).ok());
  ASSERT_TRUE(WriteRgbPng(dir_ + "/snap_20.png", RgbImage{128, 128, std::vector<uint8_t>(128 * 128 * 3, 7)}).ok());
  Status s = Read();
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("snap_20.png: is a colour PNG"));

  // A 16-bit grayscale PNG.
  png_image img;
  std::memset(&img, 0, sizeof img);
  img.version = PNG_IMAGE_VERSION;
  img.width = 128;
  img.height = 128;
  img.format = PNG_FORMAT_LINEAR_Y;
  std::vector<uint16_t> deep(128 * 128, 1000);
  ASSERT_TRUE(png_image_write_to_file(&img, (dir_ + "/snap_10.png").c_str(), 0, deep.data(), 0, nullptr));
  s = Read();
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("snap_10.png: is a 16-bit PNG"));
}

TEST_F(SnapDirectoryTest, UnknownCategoryIsNamed) {
  WriteThenEdit([](json* j) { (*j)["annotations"][1]["category_id"] = 9; });
  const Status s = Read();
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("annotations.json: annotations[1].category_id 9 names no category"));
}

TEST_F(SnapDirectoryTest, UnknownImageIsNamed) {
  WriteThenEdit([](json* j) { (*j)["annotations"][0]["image_id"] = 777; });
  const Status s = Read();
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("annotations[0].image_id 777 names no image"));
}

TEST_F(SnapDirectoryTest, BoxOutsideTheImageIsNamed) {
  WriteThenEdit([](json* j) { (*j)["annotations"][2]["bbox"] = {100, 20, 40, 10}; });
  Status s = Read();
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("annotations[2].bbox [100,20,40,10] is empty or outside its image"));

  WriteThenEdit([](json* j) { (*j)["annotations"][0]["bbox"] = {1, 2, 3}; });
  s = Read();
  EXPECT_THAT(s.message(), HasSubstr("annotations[0].bbox must be [x, y, width, height]"));
}

TEST_F(SnapDirectoryTest, MissingOrMistypedFieldsAreNamed) {
  WriteThenEdit([](json* j) { (*j)["images"][1].erase("width"); });
  EXPECT_THAT(Read().message(), HasSubstr("images[1].width is missing"));
  WriteThenEdit([](json* j) { (*j)["images"][0]["file_name"] = 5; });
  EXPECT_THAT(Read().message(), HasSubstr("images[0].file_name must be a string"));
  WriteThenEdit([](json* j) { (*j)["images"][0]["height"] = 64; });
  EXPECT_THAT(Read().message(), HasSubstr("must all be of one size"));
  WriteThenEdit([](json* j) { (*j)["images"][2]["file_name"] = "../x.png"; });
  EXPECT_THAT(Read().message(), HasSubstr("images[2].file_name \"../x.png\" must be a relative path"));
  WriteThenEdit([](json* j) { j->erase("categories"); });
  EXPECT_THAT(Read().message(), HasSubstr("has no \"categories\" array"));
  WriteThenEdit([](json* j) { (*j)["images"] = json::array(); });
  const Status s = Read();
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("\"images\" is empty"));
}

TEST_F(SnapDirectoryTest, BrokenJsonIsCorruption) {
  ASSERT_TRUE(WriteSnapDirectory(dir_, Generated(1), Categories()).ok());
  std::ofstream(dir_ + "/annotations.json") << "{\"images\": [{\"id\": 1,";
  const Status s = Read();
  EXPECT_EQ(s.code(), Status::Code::kCorruption);
  EXPECT_THAT(s.message(), HasSubstr(dir_ + "/annotations.json: not valid JSON"));
}

TEST_F(SnapDirectoryTest, UserCategoriesAreOrderedById) {
  // Real COCO files number categories sparsely; memory numbers them 0, 1, ...
  WriteThenEdit([](json* j) {
    (*j)["categories"] = {{{"id", 7}, {"name", "shoe"}}, {{"id", 3}, {"name", "bag"}}};
    for (json& a : (*j)["annotations"]) a["category_id"] = 7;
    (*j)["annotations"][0]["category_id"] = 3;
    (*j)["annotations"][0].erase("fine_class");
    (*j)["annotations"][0].erase("source_index");
  });
  std::vector<Snap> snaps;
  std::vector<std::string> categories;
  const Status s = ReadSnapDirectory(dir_, false, &snaps, &categories);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(categories, (std::vector<std::string>{"bag", "shoe"}));
  EXPECT_EQ(snaps[0].items[0].category, 0);
  EXPECT_EQ(snaps[0].items[0].fine_class, -1);
  EXPECT_EQ(snaps[0].items[0].source_index, -1);
  EXPECT_EQ(snaps[0].items[1].category, 1);
}

TEST_F(SnapDirectoryTest, RgbPngKeepsItsColours) {
  RgbImage rgb{2, 3, {255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30, 40, 50, 60, 70, 80, 90}};
  const std::string path = dir_ + "/sub/rgb.png";
  ASSERT_TRUE(WriteRgbPng(path, rgb).ok());
  png_image img;
  std::memset(&img, 0, sizeof img);
  img.version = PNG_IMAGE_VERSION;
  ASSERT_TRUE(png_image_begin_read_from_file(&img, path.c_str()));
  EXPECT_EQ(img.width, 3u);
  EXPECT_EQ(img.height, 2u);
  img.format = PNG_FORMAT_RGB;
  std::vector<uint8_t> back(PNG_IMAGE_SIZE(img));
  ASSERT_TRUE(png_image_finish_read(&img, nullptr, back.data(), 0, nullptr));
  EXPECT_EQ(back, rgb.pixels);
  EXPECT_EQ(WriteRgbPng(path, RgbImage{2, 2, std::vector<uint8_t>(5)}).code(), Status::Code::kInvalidArgument);
}

}  // namespace
}  // namespace dtrain::data
