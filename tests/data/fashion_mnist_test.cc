#include "dtrain/data/fashion_mnist.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <zlib.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "dtrain/data/transforms.h"
#include "loaded_split_test.h"
#include "temp_dir_test.h"

namespace dtrain::data {
namespace {

using ::testing::HasSubstr;

using testing::kDatasetDir;
using testing::LoadedSplit;

void AppendBigEndian32(uint32_t v, std::vector<uint8_t>* out) {
  for (int shift = 24; shift >= 0; shift -= 8) out->push_back(static_cast<uint8_t>(v >> shift));
}

std::vector<uint8_t> ImagesFile(uint32_t count, uint32_t rows, uint32_t cols, size_t pixel_bytes) {
  std::vector<uint8_t> bytes;
  AppendBigEndian32(0x00000803, &bytes);
  AppendBigEndian32(count, &bytes);
  AppendBigEndian32(rows, &bytes);
  AppendBigEndian32(cols, &bytes);
  for (size_t i = 0; i < pixel_bytes; ++i) bytes.push_back(static_cast<uint8_t>((i * 37 + i / 7) & 0xff));
  return bytes;
}

std::vector<uint8_t> LabelsFile(const std::vector<uint8_t>& labels) {
  std::vector<uint8_t> bytes;
  AppendBigEndian32(0x00000801, &bytes);
  AppendBigEndian32(static_cast<uint32_t>(labels.size()), &bytes);
  bytes.insert(bytes.end(), labels.begin(), labels.end());
  return bytes;
}

// Each test gets a fresh directory for its hand-made IDX files.
class IdxFileTest : public testing::TempDirTest {
 protected:
  std::string WriteGz(const std::string& name, const std::vector<uint8_t>& bytes) {
    const std::string path = dir_ + "/" + name;
    gzFile f = gzopen(path.c_str(), "wb");
    EXPECT_NE(f, nullptr) << path;
    if (f == nullptr) return path;
    if (!bytes.empty()) {
      EXPECT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())), static_cast<int>(bytes.size()));
    }
    EXPECT_EQ(gzclose(f), Z_OK);
    return path;
  }

  std::string WritePlain(const std::string& name, const std::vector<uint8_t>& bytes) {
    const std::string path = dir_ + "/" + name;
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    EXPECT_TRUE(out.good()) << path;
    return path;
  }

  std::vector<uint8_t> ReadRaw(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
  }
};

TEST(FashionMnistTest, TrainSplitHas6000PerClass) {
  const Dataset& ds = LoadedSplit(Split::kTrain);
  EXPECT_EQ(ds.size, 60000);
  EXPECT_EQ(ds.rows, 28);
  EXPECT_EQ(ds.cols, 28);
  EXPECT_EQ(ds.images.size(), 60000u * 28 * 28);
  EXPECT_EQ(ds.labels.size(), 60000u);
  EXPECT_THAT(ds.source, HasSubstr("train-images-idx3-ubyte.gz"));
  const DatasetSummary s = Summarize(ds);
  for (int c = 0; c < 10; ++c) EXPECT_EQ(s.per_class[c], 6000) << "class " << c;
}

TEST(FashionMnistTest, TestSplitHas1000PerClass) {
  const Dataset& ds = LoadedSplit(Split::kTest);
  EXPECT_EQ(ds.size, 10000);
  EXPECT_EQ(ds.rows, 28);
  EXPECT_EQ(ds.cols, 28);
  EXPECT_THAT(ds.source, HasSubstr("t10k-labels-idx1-ubyte.gz"));
  const DatasetSummary s = Summarize(ds);
  for (int c = 0; c < 10; ++c) EXPECT_EQ(s.per_class[c], 1000) << "class " << c;
}

TEST(FashionMnistTest, FirstLabelsAreTheKnownOnes) {
  const std::vector<uint8_t> train_first = {9, 0, 0, 3, 0, 2, 7, 2, 5, 5};
  const std::vector<uint8_t> test_first = {9, 2, 1, 1, 6, 1, 4, 6, 5, 7};
  const Dataset& train = LoadedSplit(Split::kTrain);
  const Dataset& test = LoadedSplit(Split::kTest);
  ASSERT_GE(train.size, 10);
  ASSERT_GE(test.size, 10);
  EXPECT_EQ(std::vector<uint8_t>(train.labels.begin(), train.labels.begin() + 10), train_first);
  EXPECT_EQ(std::vector<uint8_t>(test.labels.begin(), test.labels.begin() + 10), test_first);
  // Image 0 of train is an ankle boot: dark border, bright middle.
  EXPECT_EQ(train.image(0)[0], 0);
  int bright = 0;
  for (int i = 0; i < 28 * 28; ++i) bright += train.image(0)[i] > 128;
  EXPECT_GT(bright, 100);
}

TEST(FashionMnistTest, TrainPixelStatisticsMatchNormalizeDefaults) {
  const DatasetSummary s = Summarize(LoadedSplit(Split::kTrain));
  EXPECT_NEAR(s.pixel_mean, 0.28604060, 1e-7);
  EXPECT_NEAR(s.pixel_std, 0.35302424, 1e-7);
  const NormalizeOptions defaults;
  EXPECT_NEAR(defaults.mean, s.pixel_mean, 1e-4);
  EXPECT_NEAR(defaults.std, s.pixel_std, 1e-4);
}

TEST(FashionMnistTest, LimitKeepsTheFirstImages) {
  FashionMnistOptions options;
  options.dir = kDatasetDir;
  options.split = Split::kTest;
  options.limit = 100;
  Dataset limited;
  ASSERT_TRUE(LoadFashionMnist(options, &limited).ok());
  const Dataset& full = LoadedSplit(Split::kTest);
  EXPECT_EQ(limited.size, 100);
  ASSERT_EQ(limited.images.size(), 100u * 28 * 28);
  ASSERT_EQ(limited.labels.size(), 100u);
  EXPECT_TRUE(std::equal(limited.images.begin(), limited.images.end(), full.images.begin()));
  EXPECT_TRUE(std::equal(limited.labels.begin(), limited.labels.end(), full.labels.begin()));
}

TEST(FashionMnistTest, ClassesKeepOnlyTheirImagesInFileOrderBeforeTheLimit) {
  FashionMnistOptions options;
  options.dir = kDatasetDir;
  options.split = Split::kTest;
  options.classes = {9, 5};
  Dataset kept;
  ASSERT_TRUE(LoadFashionMnist(options, &kept).ok());
  const Dataset& full = LoadedSplit(Split::kTest);
  std::vector<int64_t> expected;  // indexes into the full split
  for (int64_t i = 0; i < full.size; ++i) {
    if (full.labels[static_cast<size_t>(i)] == 5 || full.labels[static_cast<size_t>(i)] == 9) expected.push_back(i);
  }
  ASSERT_EQ(kept.size, static_cast<int64_t>(expected.size()));
  EXPECT_EQ(kept.size, 2000);  // 1,000 test images per class
  ASSERT_EQ(kept.images.size(), static_cast<size_t>(kept.size) * 28 * 28);
  for (size_t j = 0; j < expected.size(); ++j) {
    ASSERT_EQ(kept.labels[j], full.labels[static_cast<size_t>(expected[j])]) << j;
    ASSERT_TRUE(std::equal(kept.image(static_cast<int64_t>(j)), kept.image(static_cast<int64_t>(j)) + 28 * 28,
                           full.image(expected[j])))
        << j;
  }
  // The limit counts kept images.
  options.limit = 10;
  Dataset limited;
  ASSERT_TRUE(LoadFashionMnist(options, &limited).ok());
  EXPECT_EQ(limited.size, 10);
  EXPECT_TRUE(std::equal(limited.images.begin(), limited.images.end(), kept.images.begin()));
  // A class that does not exist.
  options.classes = {3, 10};
  Dataset bad;
  const Status s = LoadFashionMnist(options, &bad);
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("10 is not a class"));
}

TEST(FashionMnistTest, NegativeLimitIsRejected) {
  FashionMnistOptions options;
  options.limit = -1;
  Dataset ds;
  const Status s = LoadFashionMnist(options, &ds);
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("limit must be >= 0"));
}

TEST(FashionMnistTest, NamesAreTheFashionMnistOnes) {
  EXPECT_STREQ(SplitName(Split::kTrain), "train");
  EXPECT_STREQ(SplitName(Split::kTest), "test");
  EXPECT_STREQ(ClassNames()[0], "T-shirt/top");
  EXPECT_STREQ(ClassNames()[9], "Ankle boot");
}

TEST_F(IdxFileTest, MissingDatasetIsNotFoundWithInstallHint) {
  FashionMnistOptions options;
  options.dir = dir_;
  Dataset ds;
  const Status s = LoadFashionMnist(options, &ds);
  EXPECT_EQ(s.code(), Status::Code::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr(dir_ + "/train-images-idx3-ubyte.gz"));
  EXPECT_THAT(s.message(), HasSubstr("dataset-fashion-mnist"));
  EXPECT_THAT(s.message(), HasSubstr("data.dir"));
}

TEST_F(IdxFileTest, MissingFileIsNotFound) {
  std::vector<uint8_t> labels;
  int64_t count = 0;
  const Status s = ReadIdxLabels(dir_ + "/nope-labels-idx1-ubyte.gz", &labels, &count);
  EXPECT_EQ(s.code(), Status::Code::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr(dir_ + "/nope-labels-idx1-ubyte.gz"));
}

TEST_F(IdxFileTest, GzipAndPlainFilesReadAlike) {
  const std::vector<uint8_t> bytes = ImagesFile(3, 4, 5, 60);
  const std::string gz = WriteGz("a-images.gz", bytes);
  const std::string plain = WritePlain("b-images", bytes);
  std::vector<uint8_t> px_gz, px_plain;
  int64_t n = 0;
  int rows = 0, cols = 0;
  ASSERT_TRUE(ReadIdxImages(gz, &px_gz, &n, &rows, &cols).ok());
  EXPECT_EQ(n, 3);
  EXPECT_EQ(rows, 4);
  EXPECT_EQ(cols, 5);
  ASSERT_TRUE(ReadIdxImages(plain, &px_plain, &n, &rows, &cols).ok());
  EXPECT_EQ(px_gz, px_plain);
  EXPECT_EQ(px_gz, std::vector<uint8_t>(bytes.begin() + 16, bytes.end()));
}

TEST_F(IdxFileTest, FallsBackToUncompressedFiles) {
  WritePlain("t10k-images-idx3-ubyte", ImagesFile(4, 2, 2, 16));
  WritePlain("t10k-labels-idx1-ubyte", LabelsFile({3, 1, 4, 1}));
  FashionMnistOptions options;
  options.dir = dir_;
  options.split = Split::kTest;
  Dataset ds;
  const Status s = LoadFashionMnist(options, &ds);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(ds.size, 4);
  EXPECT_EQ(ds.labels, (std::vector<uint8_t>{3, 1, 4, 1}));
  EXPECT_THAT(ds.source, HasSubstr("t10k-images-idx3-ubyte,"));
}

TEST_F(IdxFileTest, LabelFileReadAsImagesGivesWrongMagic) {
  const std::string path = WriteGz("train-images-idx3-ubyte.gz", LabelsFile({1, 2, 3}));
  std::vector<uint8_t> px;
  int64_t n = 0;
  int rows = 0, cols = 0;
  const Status s = ReadIdxImages(path, &px, &n, &rows, &cols);
  EXPECT_EQ(s.code(), Status::Code::kCorruption);
  EXPECT_THAT(s.message(), HasSubstr(path + ": wrong magic number 0x00000801, expected 0x00000803 "
                                            "(IDX unsigned-byte 3-D images); is this a label file?"));
}

TEST_F(IdxFileTest, ImageFileReadAsLabelsGivesWrongMagic) {
  const std::string path = WriteGz("x.gz", ImagesFile(1, 2, 2, 4));
  std::vector<uint8_t> labels;
  int64_t n = 0;
  const Status s = ReadIdxLabels(path, &labels, &n);
  EXPECT_EQ(s.code(), Status::Code::kCorruption);
  EXPECT_THAT(s.message(), HasSubstr("wrong magic number 0x00000803, expected 0x00000801"));
  EXPECT_THAT(s.message(), HasSubstr("is this an image file?"));
}

TEST_F(IdxFileTest, NonIdxFileIsRejected) {
  const std::string text = "<html>404 not found</html>";
  const std::string path = WritePlain("page.html", std::vector<uint8_t>(text.begin(), text.end()));
  std::vector<uint8_t> labels;
  int64_t n = 0;
  const Status s = ReadIdxLabels(path, &labels, &n);
  EXPECT_EQ(s.code(), Status::Code::kCorruption);
  EXPECT_THAT(s.message(), HasSubstr("wrong magic number 0x3c68746d"));
  EXPECT_THAT(s.message(), HasSubstr("not an IDX file"));
}

TEST_F(IdxFileTest, TruncatedPixelsAreReported) {
  std::vector<uint8_t> bytes = ImagesFile(5, 4, 3, 20);  // promises 60 bytes of pixels
  const std::string path = WriteGz("short.gz", bytes);
  std::vector<uint8_t> px;
  int64_t n = 0;
  int rows = 0, cols = 0;
  const Status s = ReadIdxImages(path, &px, &n, &rows, &cols);
  EXPECT_EQ(s.code(), Status::Code::kCorruption);
  EXPECT_THAT(s.message(), HasSubstr(path + ": truncated: header promises 5 images of 4x3 (60 bytes of pixels) "
                                            "but the file ends after 36 bytes (16-byte header + 20 bytes of pixels)"));
}

TEST_F(IdxFileTest, CutOffGzipStreamIsReportedAsTruncated) {
  const std::string full = WriteGz("full.gz", ImagesFile(200, 28, 28, 200 * 28 * 28));
  std::vector<uint8_t> compressed = ReadRaw(full);
  ASSERT_GT(compressed.size(), 100u);
  compressed.resize(compressed.size() / 2);
  const std::string path = WritePlain("cut.gz", compressed);
  std::vector<uint8_t> px;
  int64_t n = 0;
  int rows = 0, cols = 0;
  const Status s = ReadIdxImages(path, &px, &n, &rows, &cols);
  EXPECT_EQ(s.code(), Status::Code::kCorruption);
  EXPECT_THAT(s.message(), HasSubstr("truncated: header promises 200 images of 28x28 (156800 bytes of pixels)"));
  EXPECT_THAT(s.message(), HasSubstr("gzip stream itself ends early"));
}

TEST_F(IdxFileTest, TruncatedHeaderIsReported) {
  std::vector<uint8_t> bytes = ImagesFile(5, 4, 3, 0);
  bytes.resize(10);
  const std::string path = WriteGz("hdr.gz", bytes);
  std::vector<uint8_t> px;
  int64_t n = 0;
  int rows = 0, cols = 0;
  const Status s = ReadIdxImages(path, &px, &n, &rows, &cols);
  EXPECT_EQ(s.code(), Status::Code::kCorruption);
  EXPECT_THAT(s.message(), HasSubstr("truncated: the file ends after 10 bytes, inside the 16-byte IDX header"));
}

TEST_F(IdxFileTest, TrailingBytesAreReported) {
  std::vector<uint8_t> bytes = LabelsFile({1, 2, 3});
  bytes.insert(bytes.end(), {7, 7, 7, 7});
  for (const std::string& path : {WriteGz("long.gz", bytes), WritePlain("long", bytes)}) {
    std::vector<uint8_t> labels;
    int64_t n = 0;
    const Status s = ReadIdxLabels(path, &labels, &n);
    EXPECT_EQ(s.code(), Status::Code::kCorruption) << path;
    EXPECT_THAT(s.message(), HasSubstr(path + ": 4 unexpected trailing bytes: header promises 3 labels"));
  }
}

TEST_F(IdxFileTest, ImplausibleImageSizeIsRejected) {
  const std::string path = WriteGz("zero.gz", ImagesFile(1, 0, 28, 0));
  std::vector<uint8_t> px;
  int64_t n = 0;
  int rows = 0, cols = 0;
  const Status s = ReadIdxImages(path, &px, &n, &rows, &cols);
  EXPECT_EQ(s.code(), Status::Code::kCorruption);
  EXPECT_THAT(s.message(), HasSubstr("implausible image size 0x28"));
}

TEST_F(IdxFileTest, ImageLabelCountMismatchIsReported) {
  WriteGz("train-images-idx3-ubyte.gz", ImagesFile(5, 2, 2, 20));
  WriteGz("train-labels-idx1-ubyte.gz", LabelsFile({1, 2, 3, 4}));
  FashionMnistOptions options;
  options.dir = dir_;
  Dataset ds;
  const Status s = LoadFashionMnist(options, &ds);
  EXPECT_EQ(s.code(), Status::Code::kCorruption);
  EXPECT_THAT(s.message(), HasSubstr("train-images-idx3-ubyte.gz has 5 images but"));
  EXPECT_THAT(s.message(), HasSubstr("train-labels-idx1-ubyte.gz has 4 labels"));
  EXPECT_EQ(ds.size, 0);  // untouched on error
}

TEST_F(IdxFileTest, OutOfRangeLabelIsReported) {
  WriteGz("train-images-idx3-ubyte.gz", ImagesFile(3, 2, 2, 12));
  WriteGz("train-labels-idx1-ubyte.gz", LabelsFile({1, 9, 10}));
  FashionMnistOptions options;
  options.dir = dir_;
  Dataset ds;
  const Status s = LoadFashionMnist(options, &ds);
  EXPECT_EQ(s.code(), Status::Code::kCorruption);
  EXPECT_THAT(s.message(), HasSubstr("train-labels-idx1-ubyte.gz: label 10 at index 2 is out of range [0, 9]"));
}

TEST(SummarizeTest, CountsClassesAndPixelMoments) {
  Dataset ds;
  ds.size = 4;
  ds.rows = 1;
  ds.cols = 2;
  ds.images = {0, 255, 0, 255, 255, 0, 255, 0};
  ds.labels = {2, 2, 7, 0};
  const DatasetSummary s = Summarize(ds);
  EXPECT_EQ(s.size, 4);
  EXPECT_EQ(s.rows, 1);
  EXPECT_EQ(s.cols, 2);
  EXPECT_EQ(s.per_class[0], 1);
  EXPECT_EQ(s.per_class[2], 2);
  EXPECT_EQ(s.per_class[7], 1);
  EXPECT_EQ(s.per_class[1], 0);
  EXPECT_DOUBLE_EQ(s.pixel_mean, 0.5);
  EXPECT_DOUBLE_EQ(s.pixel_std, 0.5);
}

}  // namespace
}  // namespace dtrain::data
