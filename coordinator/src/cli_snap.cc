// dtrain snap index build|info, dtrain snap query: the snap index
// (indexer/snap_index.h) from the command line, in-process.
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli_coordinator.h"
#include "dtrain/coordinator/cli.h"
#include "dtrain/data/fashion_mnist.h"
#include "dtrain/data/image_io.h"
#include "dtrain/indexer/snap_index.h"
#include "dtrain/indexer/vector_index.h"

namespace dtrain::cli {
namespace {
namespace fs = std::filesystem;

struct SnapBuildArgs {
  std::string detector;
  std::string embedder;
  std::vector<std::string> embedder_for;  // CATEGORY=SOURCE
  std::string snaps;
  std::string out;
  std::string boxes = "detected";
  std::string kind = "flat";
  float min_score = 0.3f;
  int max_detections = 0;
  float pixel_weight = indexer::SnapIndexOptions().pixel_weight;
  int threads = 0;
  bool no_progress = false;
};

Status BuildSnaps(const SnapBuildArgs& a) {
  indexer::SnapIndexOptions o;
  if (!indexer::ParseSnapBoxes(a.boxes, &o.boxes)) {
    return Status::InvalidArgument("--boxes: use detected, truth or whole, not " + a.boxes);
  }
  if (!indexer::ParseIndexKind(a.kind, &o.kind)) {
    return Status::InvalidArgument("--kind: use flat, hnsw or ivf, not " + a.kind);
  }
  for (const std::string& e : a.embedder_for) {
    const size_t eq = e.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == e.size()) {
      return Status::InvalidArgument("--embedder-for " + e + ": use CATEGORY=RUN_DIR, e.g. footwear=runs/shoes");
    }
    const std::string category = e.substr(0, eq);
    if (!o.category_embedders.emplace(category, e.substr(eq + 1)).second) {
      return Status::InvalidArgument("--embedder-for: category '" + category + "' is given twice");
    }
  }
  o.detector = a.detector;
  o.embedder = a.embedder;
  o.snap_dir = a.snaps;
  o.output_dir = a.out;
  o.min_score = a.min_score;
  o.max_detections = a.max_detections;
  o.pixel_weight = a.pixel_weight;
  o.threads = a.threads;
  o.progress = !a.no_progress;
  indexer::SnapIndexSummary s;
  DTRAIN_RETURN_IF_ERROR(indexer::BuildSnapIndex(o, &s));
  std::string per;
  for (size_t c = 0; c < s.categories.size(); ++c) {
    per += (c ? ", " : "") + s.categories[c] + " " + std::to_string(s.items_per_category[c]);
  }
  std::printf("snap index %s: %lld snaps, %lld items (%s), %s boxes\n", a.out.c_str(),
              static_cast<long long>(s.snaps), static_cast<long long>(s.items), per.c_str(),
              indexer::SnapBoxesName(o.boxes));
  std::printf("%.1f snaps/s (%.1f s in all: finding items %.1f s, embedding %.1f s)\n", s.snaps_per_sec,
              s.index_seconds, s.detect_seconds, s.embed_seconds);
  return Status::OK();
}

struct SnapQueryArgs {
  std::string index;
  std::string image;
  int k = 10;
  std::string category;
  bool json = false;
  std::string out;
  float pixel_weight = -1;
  float instance_weight = indexer::SnapQueryOptions().instance_weight;
  int rerank_depth = indexer::SnapQueryOptions().rerank_depth;
  int threads = 0;
};

std::string QueryJson(const std::string& product, const indexer::SnapIndex& index,
                      const indexer::SnapQueryResult& r) {
  nlohmann::ordered_json j;
  j["product"] = product;
  j["category"] = r.category_name.empty() ? nlohmann::ordered_json() : nlohmann::ordered_json(r.category_name);
  j["category_source"] = r.category_source;
  if (r.category_source == "predicted") j["category_score"] = r.category_score;
  j["matches"] = nlohmann::ordered_json::array();
  int rank = 1;
  for (const indexer::SnapMatch& m : r.matches) {
    nlohmann::ordered_json x;
    x["rank"] = rank++;
    x["snap_id"] = m.snap_id;
    x["file"] = m.file_name;
    if (!index.snap_dir().empty() && !m.file_name.empty()) x["path"] = (fs::path(index.snap_dir()) / m.file_name).string();
    x["similarity"] = m.similarity;
    x["embedding_similarity"] = m.embedding_similarity;
    x["template_similarity"] = m.pixel_similarity;
    x["box"] = {m.item.box.x0, m.item.box.y0, m.item.box.x1, m.item.box.y1};
    x["category"] = m.category_name;
    x["detection_score"] = m.item.score;
    if (m.fine_class >= 0) x["fine_class"] = m.fine_class;
    if (m.source_index >= 0) x["source_index"] = m.source_index;
    x["items_in_snap"] = index.snaps()[static_cast<size_t>(m.snap_ordinal)].items.size();
    j["matches"].push_back(std::move(x));
  }
  j["seconds"] = {{"predict", r.predict_seconds}, {"embed", r.embed_seconds}, {"search", r.search_seconds}};
  return j.dump(2) + "\n";
}

void PrintQuery(const std::string& product, const indexer::SnapIndex& index, const indexer::SnapQueryResult& r) {
  std::printf("%s\n\n", index.Describe().c_str());
  std::printf("product %s: ", product.c_str());
  if (r.category_source == "predicted") {
    std::printf("category %s (predicted by the detector, score %.2f)\n", r.category_name.c_str(), r.category_score);
  } else if (r.category_source == "all") {
    std::printf("every category searched\n");
  } else {
    std::printf("category %s (%s)\n", r.category_name.c_str(), r.category_source.c_str());
  }
  std::printf("  %-4s %-10s %-24s %-26s %-10s %-6s %s\n", "rank", "similarity", "snap", "matched box (x0,y0,x1,y1)",
              "category", "score", "item");
  int rank = 1;
  for (const indexer::SnapMatch& m : r.matches) {
    char box[64];
    std::snprintf(box, sizeof box, "%.0f,%.0f,%.0f,%.0f", m.item.box.x0, m.item.box.y0, m.item.box.x1, m.item.box.y1);
    const std::string snap = m.file_name.empty() ? "snap " + std::to_string(m.snap_id) : m.file_name;
    std::string item = "-";
    if (m.fine_class >= 0 && m.fine_class < 10) item = data::ClassNames()[static_cast<size_t>(m.fine_class)];
    if (m.source_index >= 0) item += " [" + std::to_string(m.source_index) + "]";
    std::printf("  %-4d %-10.4f %-24s %-26s %-10s %-6.2f %s\n", rank++, m.similarity, snap.c_str(), box,
                m.category_name.c_str(), m.item.score, item.c_str());
  }
  if (r.matches.empty()) std::printf("  (no snaps: the index has no items of this category)\n");
  std::printf("(category %.1f ms, embedding %.1f ms, search %.2f ms)\n", r.predict_seconds * 1e3,
              r.embed_seconds * 1e3, r.search_seconds * 1e3);
}

Status WritePicture(const std::string& path, const data::GrayImage& product, const indexer::SnapIndex& index,
                    const indexer::SnapQueryResult& r) {
  std::string ext = fs::path(path).extension().string();
  for (char& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (ext != ".png") return Status::InvalidArgument("--out " + path + ": the picture is written as PNG (name it .png)");
  std::vector<const indexer::IndexedSnap*> snaps;
  std::vector<data::GrayImage> images;
  for (const indexer::SnapMatch& m : r.matches) {
    data::GrayImage img;
    DTRAIN_RETURN_IF_ERROR(index.ReadSnapImage(m.snap_ordinal, &img));
    snaps.push_back(&index.snaps()[static_cast<size_t>(m.snap_ordinal)]);
    images.push_back(std::move(img));
  }
  data::RgbImage picture;
  DTRAIN_RETURN_IF_ERROR(indexer::DrawSnapResults(product, r, snaps, images, {}, &picture));
  return data::WriteRgbPng(path, picture);
}

Status QuerySnaps(const SnapQueryArgs& a) {
  if (a.index.empty()) return Status::InvalidArgument("--index INDEX_DIR is required");
  if (a.image.empty()) return Status::InvalidArgument("--image PRODUCT.png is required");
  data::GrayImage product;
  DTRAIN_RETURN_IF_ERROR(data::ReadGrayImage(a.image, &product));
  indexer::SnapIndexOpenOptions oo;
  oo.index_dir = a.index;
  oo.threads = a.threads;
  std::unique_ptr<indexer::SnapIndex> index;
  DTRAIN_RETURN_IF_ERROR(indexer::SnapIndex::Open(oo, &index));
  indexer::SnapQueryOptions qo;
  qo.k = a.k;
  qo.category = a.category;
  qo.pixel_weight = a.pixel_weight;
  qo.instance_weight = a.instance_weight;
  qo.rerank_depth = a.rerank_depth;
  indexer::SnapQueryResult r;
  DTRAIN_RETURN_IF_ERROR(index->Query(product, qo, &r));
  if (a.json) {
    std::fputs(QueryJson(a.image, *index, r).c_str(), stdout);
  } else {
    PrintQuery(a.image, *index, r);
  }
  if (!a.out.empty()) {
    DTRAIN_RETURN_IF_ERROR(WritePicture(a.out, product, *index, r));
    if (!a.json) std::printf("picture written to %s (matched boxes green, other items orange)\n", a.out.c_str());
  }
  return Status::OK();
}

Status SnapInfo(const std::string& dir) {
  indexer::SnapIndexOpenOptions oo;
  oo.index_dir = dir;
  oo.threads = 1;
  std::unique_ptr<indexer::SnapIndex> index;
  DTRAIN_RETURN_IF_ERROR(indexer::SnapIndex::Open(oo, &index));
  std::printf("%s\n", index->Describe().c_str());
  for (size_t c = 0; c < index->categories().size(); ++c) {
    std::printf("  %-12s %lld items\n", index->categories()[c].c_str(),
                static_cast<long long>(index->items(static_cast<int>(c))));
  }
  return Status::OK();
}

}  // namespace

void AddSnapCommands(CLI::App& app, int* exit_code) {
  CLI::App* snap = app.add_subcommand("snap", "street snaps searchable by product image: build a snap index, query it");
  snap->require_subcommand(1);
  CLI::App* index = snap->add_subcommand("index", "build or describe a snap index");
  index->require_subcommand(1);

  auto b = std::make_shared<SnapBuildArgs>();
  CLI::App* build = index->add_subcommand(
      "build",
      "detect the items of every snap, embed each crop with its category's embedder and index them "
      "(FAISS per category, metadata in RocksDB)");
  build->add_option("--snaps", b->snaps, "snap directory: PNG/PGM snaps and a COCO annotations.json "
                                         "(`dtrain data snaps` writes one)")
      ->required();
  build->add_option("--out", b->out, "snap index directory to write (replaced atomically if it is a snap index)")
      ->required();
  build->add_option("--detector", b->detector,
                    "detector run directory or model file (needed for --boxes detected; with truth, queries "
                    "predict their category with it)");
  build->add_option("--embedder", b->embedder, "embedder run directory or model file, shared by every category");
  build->add_option("--embedder-for", b->embedder_for,
                    "CATEGORY=RUN_DIR: the embedder of one category, instead of the shared one (repeatable)");
  build->add_option("--boxes", b->boxes,
                    "detected (the detector's boxes), truth (the annotations' boxes) or whole (each snap whole, "
                    "no detector)")
      ->capture_default_str();
  build->add_option("--min-score", b->min_score, "detected boxes: lowest detection score indexed")
      ->capture_default_str();
  build->add_option("--max-detections", b->max_detections,
                    "detected boxes: most per snap (0: the detector config's max_detections)");
  build->add_option("--kind", b->kind, "FAISS index of each category: flat (exact), hnsw or ivf")
      ->capture_default_str();
  build->add_option("--pixel-weight", b->pixel_weight,
                    "the item templates' weight in the query score, 0-1 (0: the embedding alone); stored in the "
                    "index as its default")
      ->capture_default_str();
  build->add_option("--threads", b->threads, "torch threads (0: every core)");
  build->add_flag("--no-progress", b->no_progress, "no progress bars");
  OnRun(build, "dtrain snap index build", exit_code, [b] { return BuildSnaps(*b); });

  auto dir = std::make_shared<std::string>();
  CLI::App* info = index->add_subcommand("info", "describe a snap index: mode, snaps, items per category");
  info->add_option("INDEX", *dir, "snap index directory")->required();
  OnRun(info, "dtrain snap index info", exit_code, [dir] { return SnapInfo(*dir); });

  auto q = std::make_shared<SnapQueryArgs>();
  CLI::App* query = snap->add_subcommand(
      "query",
      "the snaps holding items most like a product image: its category is predicted by the index's detector "
      "(the product centred on a blank snap) unless --category is given");
  query->add_option("--index", q->index, "snap index directory")->required();
  query->add_option("--image", q->image, "product image: PNG or PGM, 8-bit grayscale, any size (fitted to 28x28)")
      ->required();
  query->add_option("-k,--top", q->k, "snaps to return")->capture_default_str();
  query->add_option("--category", q->category, "search this category instead of the predicted one");
  query->add_flag("--json", q->json, "print JSON");
  query->add_option("--out", q->out,
                    "write a picture (PNG): the product, then the top snaps with the matched box in green and "
                    "the other items in orange");
  query->add_option("--pixel-weight", q->pixel_weight,
                    "the item templates' weight in the score, 0-1 (-1: the index's)")
      ->capture_default_str();
  query->add_option("--instance-weight", q->instance_weight,
                    "bonus for an item whose template matches the product's (0: none)")
      ->capture_default_str();
  query->add_option("--rerank-depth", q->rerank_depth, "embedding candidates compared by template, at least")
      ->capture_default_str();
  query->add_option("--threads", q->threads, "torch threads (0: every core)");
  OnRun(query, "dtrain snap query", exit_code, [q] { return QuerySnaps(*q); });
}

}  // namespace dtrain::cli
