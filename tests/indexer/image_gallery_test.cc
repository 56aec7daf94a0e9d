// Image files, galleries, the FAISS wrapper and the metadata store: no model.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <png.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>

#include "dtrain/data/image_io.h"
#include "dtrain/indexer/gallery.h"
#include "dtrain/indexer/metadata_store.h"
#include "dtrain/indexer/vector_index.h"

namespace dtrain::indexer {
namespace {

using data::DecodeGrayImage;
using data::GrayImage;
using data::ReadGrayImage;
using data::WriteGrayPng;

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class IndexerFilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dtrain_idxfiles_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  static GrayImage Pattern(int rows, int cols, int seed) {
    GrayImage g;
    g.rows = rows;
    g.cols = cols;
    for (int i = 0; i < rows * cols; ++i) g.pixels.push_back(static_cast<uint8_t>((i * 7 + seed * 31) & 0xff));
    return g;
  }
  void WriteFile(const fs::path& p, const std::string& bytes) {
    fs::create_directories(p.parent_path());
    std::ofstream(p, std::ios::binary) << bytes;
  }
  fs::path dir_;
};

TEST_F(IndexerFilesTest, PngRoundTripsAndPgmDecodes) {
  const GrayImage g = Pattern(28, 28, 3);
  ASSERT_TRUE(WriteGrayPng((dir_ / "a.png").string(), g).ok());
  GrayImage back;
  ASSERT_TRUE(ReadGrayImage((dir_ / "a.png").string(), &back).ok());
  EXPECT_EQ(back.rows, 28);
  EXPECT_EQ(back.cols, 28);
  EXPECT_EQ(back.pixels, g.pixels);

  // Binary PGM with a comment; plain PGM with maxval 15 (scaled to 0..255).
  std::string p5 = "P5\n# made by a test\n3 2\n255\n";
  p5 += std::string("\x00\x10\x20\x30\x40\xff", 6);
  ASSERT_TRUE(DecodeGrayImage(p5, "p5", &back).ok());
  EXPECT_EQ(back.rows, 2);
  EXPECT_EQ(back.cols, 3);
  EXPECT_EQ(back.pixels, (std::vector<uint8_t>{0x00, 0x10, 0x20, 0x30, 0x40, 0xff}));
  ASSERT_TRUE(DecodeGrayImage("P2 2 1 15\n0 15\n", "p2", &back).ok());
  EXPECT_EQ(back.pixels, (std::vector<uint8_t>{0, 255}));
}

TEST_F(IndexerFilesTest, BadImagesAreRefusedWithTheReason) {
  GrayImage out;
  // Colour PNG.
  png_image img;
  std::memset(&img, 0, sizeof img);
  img.version = PNG_IMAGE_VERSION;
  img.width = 4;
  img.height = 4;
  img.format = PNG_FORMAT_RGB;
  std::vector<uint8_t> rgb(4 * 4 * 3, 100);
  ASSERT_TRUE(png_image_write_to_file(&img, (dir_ / "rgb.png").c_str(), 0, rgb.data(), 0, nullptr));
  Status st = ReadGrayImage((dir_ / "rgb.png").string(), &out);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("colour"));
  EXPECT_THAT(st.message(), HasSubstr("rgb.png"));
  // 16-bit PGM, truncated PGM, not an image, empty, missing.
  st = DecodeGrayImage("P5 2 2 65535\n12345678", "deep.pgm", &out);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("16-bit"));
  st = DecodeGrayImage("P5 4 4 255\nabc", "short.pgm", &out);
  EXPECT_EQ(st.code(), Status::Code::kCorruption);
  EXPECT_THAT(st.message(), HasSubstr("truncated"));
  EXPECT_EQ(DecodeGrayImage("GIF89a....", "x.gif", &out).code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(DecodeGrayImage("", "empty.png", &out).code(), Status::Code::kCorruption);
  EXPECT_EQ(ReadGrayImage((dir_ / "none.png").string(), &out).code(), Status::Code::kNotFound);
  // A damaged PNG: the signature, then garbage.
  WriteFile(dir_ / "bad.png", std::string("\x89PNG\r\n\x1a\n", 8) + "garbage garbage garbage");
  EXPECT_EQ(ReadGrayImage((dir_ / "bad.png").string(), &out).code(), Status::Code::kCorruption);
}

TEST_F(IndexerFilesTest, DirectoryGalleryLabelsBySubdirectoryWithStableIds) {
  ASSERT_TRUE(WriteGrayPng((dir_ / "shoes/b.png").string(), Pattern(28, 28, 1)).ok());
  ASSERT_TRUE(WriteGrayPng((dir_ / "shoes/a.png").string(), Pattern(28, 28, 2)).ok());
  ASSERT_TRUE(WriteGrayPng((dir_ / "bags/c.png").string(), Pattern(28, 28, 3)).ok());
  ASSERT_TRUE(WriteGrayPng((dir_ / "loose.png").string(), Pattern(28, 28, 4)).ok());
  WriteFile(dir_ / "README.txt", "not an image");
  GalleryOptions o;
  o.spec = dir_.string();
  Gallery g;
  ASSERT_TRUE(LoadGallery(o, &g).ok());
  ASSERT_EQ(g.images.size, 4);
  EXPECT_EQ(g.label_names, (std::vector<std::string>{"bags", "shoes"}));
  // Sorted by path: bags/c, loose, shoes/a, shoes/b.
  EXPECT_EQ(g.items[0].source(), "bags/c.png");
  EXPECT_EQ(g.items[0].label(), 0);
  EXPECT_EQ(g.items[1].label(), -1);
  EXPECT_EQ(g.items[3].label_name(), "shoes");
  EXPECT_EQ(g.items[3].id(), PathId("shoes/b.png"));
  EXPECT_GE(g.items[3].id(), 0);
  EXPECT_EQ(std::vector<uint8_t>(g.images.image(3), g.images.image(3) + 28 * 28), Pattern(28, 28, 1).pixels);
  // Loading again gives the same ids.
  Gallery again;
  ASSERT_TRUE(LoadGallery(o, &again).ok());
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(again.items[i].id(), g.items[i].id());
}

TEST_F(IndexerFilesTest, BadGalleriesAreRefused) {
  Gallery g;
  GalleryOptions o;
  o.spec = (dir_ / "missing").string();
  EXPECT_EQ(LoadGallery(o, &g).code(), Status::Code::kNotFound);
  o.spec = dir_.string();
  Status st = LoadGallery(o, &g);
  EXPECT_EQ(st.code(), Status::Code::kFailedPrecondition);
  EXPECT_THAT(st.message(), HasSubstr("no .png or .pgm"));
  ASSERT_TRUE(WriteGrayPng((dir_ / "a.png").string(), Pattern(28, 28, 1)).ok());
  ASSERT_TRUE(WriteGrayPng((dir_ / "b.png").string(), Pattern(32, 32, 1)).ok());
  st = LoadGallery(o, &g);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("b.png is 32x32"));
  o.spec = "fashion_mnist:validation";
  EXPECT_EQ(LoadGallery(o, &g).code(), Status::Code::kInvalidArgument);
  o.spec = "fashion_mnist:test";
  o.limit = 50;
  ASSERT_TRUE(LoadGallery(o, &g).ok());
  EXPECT_EQ(g.images.size, 50);
  EXPECT_EQ(g.items[7].id(), 7);
  EXPECT_EQ(g.items[7].dataset_index(), 7);
  EXPECT_EQ(g.items[7].label(), g.images.labels[7]);
  EXPECT_TRUE(g.is_dataset);
}

// Random unit vectors in clusters (so approximate search has structure).
std::vector<float> UnitVectors(int64_t n, int dim, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> centres(10 * dim);
  for (float& c : centres) c = normal(rng);
  std::vector<float> v(static_cast<size_t>(n) * dim);
  for (int64_t i = 0; i < n; ++i) {
    double norm = 0;
    for (int d = 0; d < dim; ++d) {
      float x = centres[(i % 10) * dim + d] + 0.7f * normal(rng);
      v[i * dim + d] = x;
      norm += x * x;
    }
    for (int d = 0; d < dim; ++d) v[i * dim + d] = static_cast<float>(v[i * dim + d] / std::sqrt(norm));
  }
  return v;
}

TEST_F(IndexerFilesTest, FlatSearchMatchesBruteForce) {
  const int dim = 16;
  const int64_t n = 500, nq = 20;
  const std::vector<float> v = UnitVectors(n, dim, 1), q = UnitVectors(nq, dim, 2);
  std::vector<int64_t> ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = 1000 + 3 * i;  // arbitrary, stable ids
  IndexConfig p;
  p.set_kind(IndexConfig::FLAT);
  std::unique_ptr<VectorIndex> index;
  ASSERT_TRUE(VectorIndex::Build(p, dim, v.data(), ids.data(), n, &index).ok());
  std::vector<float> scores;
  std::vector<int64_t> got;
  const int k = 5;
  ASSERT_TRUE(index->Search(q.data(), nq, k, &scores, &got).ok());
  for (int64_t i = 0; i < nq; ++i) {
    std::vector<std::pair<float, int64_t>> all;
    for (int64_t j = 0; j < n; ++j) {
      float dot = 0;
      for (int d = 0; d < dim; ++d) dot += q[i * dim + d] * v[j * dim + d];
      all.emplace_back(dot, ids[j]);
    }
    std::sort(all.begin(), all.end(), [](auto& a, auto& b) { return a.first > b.first; });
    for (int j = 0; j < k; ++j) {
      EXPECT_EQ(got[i * k + j], all[j].second) << "query " << i << " rank " << j;
      EXPECT_NEAR(scores[i * k + j], all[j].first, 1e-5);
    }
  }
  // The vectors read back are the ones stored.
  std::vector<float> back;
  std::vector<int64_t> back_ids;
  ASSERT_TRUE(index->ReconstructAll(&back, &back_ids).ok());
  EXPECT_EQ(back_ids, ids);
  EXPECT_EQ(back, v);
}

TEST_F(IndexerFilesTest, ThreeKindsSaveLoadAndAgreeWithExactSearch) {
  const int dim = 16;
  const int64_t n = 2000, nq = 100;
  const std::vector<float> v = UnitVectors(n, dim, 3), q = UnitVectors(nq, dim, 4);
  std::vector<int64_t> ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = i;
  IndexConfig flat;
  flat.set_kind(IndexConfig::FLAT);
  std::unique_ptr<VectorIndex> exact;
  ASSERT_TRUE(VectorIndex::Build(flat, dim, v.data(), ids.data(), n, &exact).ok());
  std::vector<float> es;
  std::vector<int64_t> eids;
  ASSERT_TRUE(exact->Search(q.data(), nq, 10, &es, &eids).ok());
  for (IndexConfig::Kind kind : {IndexConfig::FLAT, IndexConfig::HNSW, IndexConfig::IVF}) {
    SCOPED_TRACE(IndexKindName(kind));
    IndexConfig p;
    p.set_kind(kind);
    p.set_hnsw_m(16);
    p.set_hnsw_ef_construction(100);
    p.set_hnsw_ef_search(64);
    p.set_ivf_nlist(20);
    p.set_ivf_nprobe(8);
    std::unique_ptr<VectorIndex> index;
    IndexConfig used;
    ASSERT_TRUE(VectorIndex::Build(p, dim, v.data(), ids.data(), n, &index, &used).ok());
    std::vector<float> s1;
    std::vector<int64_t> i1;
    ASSERT_TRUE(index->Search(q.data(), nq, 10, &s1, &i1).ok());
    // Recall@10 against exact search.
    int hits = 0;
    for (int64_t i = 0; i < nq; ++i) {
      std::set<int64_t> truth(eids.begin() + i * 10, eids.begin() + i * 10 + 10);
      for (int j = 0; j < 10; ++j) hits += truth.count(i1[i * 10 + j]) ? 1 : 0;
    }
    EXPECT_GE(hits / (10.0 * nq), kind == IndexConfig::FLAT ? 1.0 : 0.9);
    // Save -> load -> the same answers.
    const std::string path = (dir_ / (std::string(IndexKindName(kind)) + ".faiss")).string();
    ASSERT_TRUE(index->Save(path).ok());
    std::unique_ptr<VectorIndex> loaded;
    ASSERT_TRUE(VectorIndex::Load(path, used, &loaded).ok());
    EXPECT_EQ(loaded->kind(), kind);
    EXPECT_EQ(loaded->size(), n);
    std::vector<float> s2;
    std::vector<int64_t> i2;
    ASSERT_TRUE(loaded->Search(q.data(), nq, 10, &s2, &i2).ok());
    EXPECT_EQ(i1, i2);
    EXPECT_EQ(s1, s2);
    // A manifest that names another kind is caught.
    IndexConfig other = used;
    other.set_kind(kind == IndexConfig::FLAT ? IndexConfig::HNSW : IndexConfig::FLAT);
    EXPECT_EQ(VectorIndex::Load(path, other, &loaded).code(), Status::Code::kCorruption);
  }
}

TEST_F(IndexerFilesTest, HnswDeepSearchReturnsKResultsWhenEfSearchIsRaised) {
  const int dim = 8;
  const int64_t n = 2000;
  const std::vector<float> v = UnitVectors(n, dim, 6), q = UnitVectors(5, dim, 7);
  std::vector<int64_t> ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = 5000 + i;
  IndexConfig p;
  p.set_kind(IndexConfig::HNSW);
  p.set_hnsw_m(16);
  p.set_hnsw_ef_search(16);
  std::unique_ptr<VectorIndex> index, exact;
  ASSERT_TRUE(VectorIndex::Build(p, dim, v.data(), ids.data(), n, &index).ok());
  p.set_kind(IndexConfig::FLAT);
  ASSERT_TRUE(VectorIndex::Build(p, dim, v.data(), ids.data(), n, &exact).ok());
  const int k = 300;
  std::vector<float> s, es;
  std::vector<int64_t> got, truth;
  ASSERT_TRUE(exact->Search(q.data(), 5, k, &es, &truth).ok());
  ASSERT_TRUE(index->Search(q.data(), 5, k, &s, &got, /*hnsw_ef_search=*/k).ok());
  int valid = 0, hits = 0;
  for (int i = 0; i < 5; ++i) {
    std::set<int64_t> t(truth.begin() + i * k, truth.begin() + (i + 1) * k);
    for (int j = 0; j < k; ++j) {
      valid += got[i * k + j] >= 5000 ? 1 : 0;  // real ids, mapped through the id map
      hits += t.count(got[i * k + j]) ? 1 : 0;
    }
  }
  EXPECT_EQ(valid, 5 * k);
  EXPECT_GE(hits, 0.95 * 5 * k);
}

TEST_F(IndexerFilesTest, IndexRejectsBadInput) {
  const std::vector<float> v = UnitVectors(10, 4, 5);
  std::vector<int64_t> ids = {1, 2, 3, 4, 5, 6, 7, 8, 9, 1};  // 1 repeats
  IndexConfig p;
  std::unique_ptr<VectorIndex> index;
  EXPECT_EQ(VectorIndex::Build(p, 4, v.data(), ids.data(), 10, &index).code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(VectorIndex::Build(p, 4, v.data(), ids.data(), 0, &index).code(), Status::Code::kInvalidArgument);
  // IVF with more cells than vectors: nlist is capped.
  ids.back() = 10;
  p.set_kind(IndexConfig::IVF);
  p.set_ivf_nlist(256);
  IndexConfig used;
  ASSERT_TRUE(VectorIndex::Build(p, 4, v.data(), ids.data(), 10, &index, &used).ok());
  EXPECT_EQ(used.ivf_nlist(), 10);
  EXPECT_LE(used.ivf_nprobe(), 10);
  WriteFile(dir_ / "junk.faiss", "this is not a faiss index");
  EXPECT_EQ(VectorIndex::Load((dir_ / "junk.faiss").string(), p, &index).code(), Status::Code::kCorruption);
  std::vector<float> s;
  std::vector<int64_t> r;
  ASSERT_TRUE(VectorIndex::Build(p, 4, v.data(), ids.data(), 10, &index).ok());
  EXPECT_EQ(index->Search(v.data(), 1, 0, &s, &r).code(), Status::Code::kInvalidArgument);
}

TEST_F(IndexerFilesTest, MetadataRoundTrips) {
  std::vector<ItemMeta> items(3);
  for (int i = 0; i < 3; ++i) {
    items[i].set_id(int64_t{1} << (40 + i));
    items[i].set_label(i);
    items[i].set_label_name("class " + std::to_string(i));
    items[i].set_source("dir/img" + std::to_string(i) + ".png");
  }
  {
    std::unique_ptr<MetadataStore> store;
    ASSERT_TRUE(MetadataStore::Create((dir_ / "meta").string(), &store).ok());
    ASSERT_TRUE(store->PutAll(items).ok());
  }
  std::unique_ptr<MetadataStore> store;
  EXPECT_EQ(MetadataStore::Create((dir_ / "meta").string(), &store).code(), Status::Code::kAlreadyExists);
  ASSERT_TRUE(MetadataStore::OpenReadOnly((dir_ / "meta").string(), &store).ok());
  int64_t count = 0;
  ASSERT_TRUE(store->Count(&count).ok());
  EXPECT_EQ(count, 3);
  for (const ItemMeta& m : items) {
    ItemMeta got;
    ASSERT_TRUE(store->Get(m.id(), &got).ok());
    EXPECT_EQ(got.SerializeAsString(), m.SerializeAsString());
  }
  ItemMeta none;
  EXPECT_EQ(store->Get(12345, &none).code(), Status::Code::kNotFound);
}

}  // namespace
}  // namespace dtrain::indexer
