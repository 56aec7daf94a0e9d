// The snap index: street snaps made searchable by product image (issue 11).
// A detector finds the items of every snap, an embedder per category turns
// each item's crop into a vector, and a query returns the snaps whose items
// are nearest to a product image.
//
// BuildSnapIndex, as numbered steps:
//  1. Load the snaps: a snap directory (data::ReadSnapDirectory: PNG/PGM
//     images and COCO annotations.json) or snaps given in memory. All snaps
//     are 8-bit grayscale of one size.
//  2. Load the models and settle the index's categories:
//       DETECTED      the detector's (models::DetectorCategories of the
//                     ModelConfig its file carries);
//       GROUND_TRUTH  the detector's when one is given, else the
//                     annotations';
//       WHOLE_SNAP    one category, "snap" (no detector).
//     Every annotated item must name one of them. Each category is embedded
//     by category_embedders[name] when given, else by the shared embedder;
//     a per-category embedder for a category the index does not have, or a
//     category left without an embedder, is an error.
//  3. Find the items of every snap:
//       DETECTED      the detector's boxes (worker::Detect), at most
//                     max_detections per snap with score >= min_score
//                     (boxes under 1 px wide or high are dropped);
//       GROUND_TRUTH  the annotations' boxes (score 1);
//       WHOLE_SNAP    the whole snap, one item per snap (score 1).
//     A detected box takes the fine class and source index of the annotated
//     item it overlaps most (IoU >= 0.5) when the annotations know them.
//  4. Crop every item (CropSquare: the square of side max(w, h) centred on
//     the box, 0 outside the snap, resampled to 28x28, the embedders' size;
//     Fashion-MNIST items are centred in a square with their long side
//     filling it, so this is the view the embedders were trained on), then,
//     with normalize_crops, NormalizeCrop: the background level subtracted
//     and the contrast stretched, as Fashion-MNIST items sit on black at
//     full contrast while snap items sit on textured backgrounds under
//     varied lighting (on the tests' snaps this lifts the clean-source
//     Recall@3 of a briefly trained embedder from about 0.4 to 0.8).
//  5. Embed the crops with their category's embedder (batches, all cores,
//     eval mode, no gradients; unit rows, so inner product is cosine), and
//     keep every item's template: CropSquare of the raw snap (no
//     NormalizeCrop) at kItemTemplateSide x kItemTemplateSide.
//  6. Per category with items, an ordinary index directory (the layout of
//     index_builder.h: model.pt, index.faiss, meta/, manifest.textproto)
//     under categories/<i>_<name>/: `dtrain index query` works on each. Item
//     ids are snap_ordinal * kMaxItemsPerSnap + item_ordinal (the snap's
//     position in the build's snap list, the item's in that snap's items);
//     the metadata store maps each id to ItemMeta {label: fine class or -1,
//     label_name: its Fashion-MNIST name, source: the snap's file name,
//     dataset_index: the item's source index or -1}. Beside them,
//     templates.u8: the item templates of the category's items (format:
//     kItemTemplateFile below).
//  7. detector.pt (the detector, with its config; DETECTED and GROUND_TRUTH
//     with a detector) and snap_index.json last: the format version, the
//     settings (pixel_weight and the templates' kind and size among them),
//     the categories and where their indexes are, the snap
//     directory, and the snap table (id, file name, every indexed box with
//     its category and score).
// Everything is written into "<out>.tmp-<pid>-<n>" and renamed into place
// only when complete (an existing snap index is moved aside first, then
// removed); a failure at any step removes the temporary directory, so <out>
// is the previous index or the new one, never half of one. An <out> that
// exists, is not empty and is not a snap index is never replaced.
//
// Queries (SnapIndex::Query):
//  1. The product image (any size, 8-bit grayscale) is made the embedders'
//     28x28 input with CropSquare over the whole image (and NormalizeCrop
//     when the index normalises its crops; products are expected on a dark
//     background, as Fashion-MNIST's are).
//  2. Its category: the one given (SnapQueryOptions::category), else the
//     detector's prediction: the 28x28 product (before NormalizeCrop: the
//     detector learnt raw snaps) is placed at the centre of a
//     blank canvas of the snaps' size and the category of the
//     highest-scoring detection is taken (the detector learnt items on such
//     canvases, at 0.6-1.6x their 28 px size). An index without a detector
//     (GROUND_TRUTH built without one) searches every category, ranking all
//     items together; WHOLE_SNAP has the one category.
//  3. That category's index is searched for more than k items (several items
//     may come from one snap), deeper until k distinct snaps are found or the
//     index is exhausted; when templates are compared (step 4), at least
//     rerank_depth items deep (at most the category's item count).
//  4. Re-ranking, with a pixel weight w > 0 or an instance weight g > 0:
//     every candidate item's template is compared with the product's
//     (TemplateSimilarity: ProductTemplate, the tight box of the product's
//     pixels, against the item's box; masked normalised cross-correlation,
//     t in [-1, 1]) and the item is scored
//       (1 - w) * embedding cosine + w * t
//         + g * clamp((t - instance_threshold) / (1 - instance_threshold), 0, 1),
//     the last term (the instance bonus) only for the items whose t is within
//     instance_margin of the best t among the query's candidates.
//     Why: the ArcFace embedders learnt the 10 Fashion-MNIST classes, so
//     they group items by class but barely tell two shirts apart (instance
//     Recall@5 about 0.4 on bench/snaps), while the template says whether
//     an item is the very product: over the product's own pixels the snap
//     shows the same image, rescaled and brightened, whatever the
//     background (the very item scores 0.96 at the median, the best other
//     item of the category 0.78, on ground-truth boxes). The linear term
//     adds the templates' shape evidence to the embedding's class
//     evidence; the bonus lifts the item that is most likely the very
//     product (and any about as likely) above the class ranking without
//     letting the many fair template matches of other items of the class
//     reorder it. The defaults (w 0.4, g 1, threshold 0.7, margin 0.05) were
//     chosen on snaps of another seed than bench/snaps's (docs/snaps.md).
//     With w = 0 and g = 0 the score is the embedding cosine alone and no
//     template is read.
//  5. Snaps are ranked by their best item's score; each of the top-k snaps
//     is returned with the matched item (box, scores, detection score,
//     category, fine class when known); SnapIndex::snaps()[snap_ordinal]
//     lists every item indexed in it.
//
// Thread-safety: a SnapIndex is immutable after Open; Query and the other
// const methods may be called from many threads at once (eval-mode forward,
// FAISS search and RocksDB reads only read shared state). BuildSnapIndex is
// for one thread.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/data/image_io.h"
#include "dtrain/data/snaps.h"
#include "dtrain/job.pb.h"

namespace dtrain::indexer {

class Searcher;

// Items one snap may contribute (the id scheme of step 6).
inline constexpr int64_t kMaxItemsPerSnap = 256;
// The category of a WHOLE_SNAP index.
inline constexpr const char* kWholeSnapCategory = "snap";

enum class SnapBoxes {
  kDetected,     // the detector's boxes
  kGroundTruth,  // the annotations' boxes
  kWholeSnap,    // the whole snap as one item
};

// "detected", "truth" (or "ground_truth"), "whole" (or "whole_snap") <->
// SnapBoxes, case-insensitive.
bool ParseSnapBoxes(const std::string& name, SnapBoxes* boxes);
const char* SnapBoxesName(SnapBoxes boxes);

struct SnapIndexOptions {
  // The snaps (step 1): a snap directory ...
  std::string snap_dir;
  // ... or, when snap_dir is empty, snaps in memory (with pixels; not owned,
  // read during the call only) whose categories are `snap_categories`
  // (default: data::CoarseCategoryNames()). Such an index cannot draw its
  // snaps (SnapIndex::ReadSnapImage), having no files to read them from.
  const std::vector<data::Snap>* snaps = nullptr;
  std::vector<std::string> snap_categories;
  // Default: DETECTED.
  SnapBoxes boxes = SnapBoxes::kDetected;
  // The detector: a detector run directory (its model.pt) or model file.
  // Required for DETECTED; optional for GROUND_TRUTH (queries then predict
  // their category with it); refused with WHOLE_SNAP.
  std::string detector;
  // The embedder of every category: a run directory or a model file.
  std::string embedder;
  // One embedder per category (category name -> run directory or model
  // file), taking precedence over `embedder` for those categories. Refused
  // with WHOLE_SNAP (it has no categories).
  std::map<std::string, std::string> category_embedders;
  // The index directory to write.
  std::string output_dir;
  // DETECTED: boxes kept per snap, at most max_detections (0: the detector
  // config's max_detections; at most kMaxItemsPerSnap) with score >=
  // min_score. Default min_score: 0.3 (the detector config's
  // score_threshold, 0.05 by default, suits AP, which wants every candidate;
  // an index wants the items that are there).
  int max_detections = 0;
  float min_score = 0.3f;
  // NormalizeCrop every crop (and, at query time, every product image).
  // Default: true.
  bool normalize_crops = true;
  // FAISS index kind of every category (HNSW and IVF take IndexConfig's
  // default parameters). Default: FLAT (exact; snap sets are small).
  IndexConfig::Kind kind = IndexConfig::FLAT;
  // The weight w of the template similarity in the query score (query step
  // 4): (1 - w) * embedding cosine + w * template similarity (+ the
  // instance bonus); in [0, 1]. Stored in snap_index.json; queries may
  // override it. Default: 0.4.
  float pixel_weight = 0.4f;
  // Snaps per detector batch and crops per embedding batch.
  int detect_batch_size = 32;
  int embed_batch_size = 512;
  bool progress = true;
  // Torch threads; 0 = every core.
  int threads = 0;
};

struct SnapIndexSummary {
  int64_t snaps = 0;
  int64_t items = 0;
  std::vector<std::string> categories;
  std::vector<int64_t> items_per_category;
  // Seconds: finding the items (detector; cropping included), embedding,
  // everything after loading the snaps and models (detect, crop, embed,
  // FAISS, writing).
  double detect_seconds = 0;
  double embed_seconds = 0;
  double index_seconds = 0;
  // snaps / index_seconds.
  double snaps_per_sec = 0;
};

// Steps 1-7. Errors, each naming the file, field or category: NotFound for a
// missing snap directory, annotations.json, image, detector or embedder;
// InvalidArgument for an empty snap directory, an image of another size or
// depth, annotations naming a category the index does not know, embedders
// that do not match the categories, options that do not fit the mode or out
// of range (pixel_weight outside [0, 1]);
// FailedPrecondition for an output path that exists and is not a snap
// index, or when no item at all was found (detected boxes are dropped when
// under 1 px or under min_score). Nothing is left at or beside output_dir
// on failure.
Status BuildSnapIndex(const SnapIndexOptions& options, SnapIndexSummary* summary);

// True when `dir` holds snap_index.json (a complete snap index).
bool IsSnapIndexDir(const std::string& dir);

// The model input for the item in `box` of a rows x cols grayscale image:
// the square of side max(box width, box height) centred on the box, pixels
// outside the image taken as 0, resampled to size x size with a triangle
// filter (bilinear when enlarging, its antialiased form when shrinking).
// With the box (0, 0, cols, rows) this fits a whole image, padded to a
// square, into size x size.
data::GrayImage CropSquare(const uint8_t* pixels, int rows, int cols, const data::SnapBox& box, int size = 28);

// Brings a crop to Fashion-MNIST's look: subtracts the median of its border
// pixels (the background around a centred item), clamping at 0, then
// scales it so that its brightest pixel is 255 (a blank crop stays black).
void NormalizeCrop(data::GrayImage* image);

// The item template (build step 5, query step 4): the item's square crop
// (CropSquare) of the raw snap at kItemTemplateSide x kItemTemplateSide.
inline constexpr int kItemTemplateSide = 24;
inline constexpr int kItemTemplatePixels = kItemTemplateSide * kItemTemplateSide;
// Pixels of a product image above this value belong to the product (its
// mask); the snap generator draws item pixels above the same value.
inline constexpr int kItemMaskThreshold = 20;
// Template shifts tried in each direction, in template pixels.
inline constexpr int kTemplateMaxShift = 1;

// The tight box of the pixels of `image` above `threshold`; the whole image
// when there are none.
data::SnapBox ItemBounds(const data::GrayImage& image, int threshold = kItemMaskThreshold);

// A product image's template: CropSquare of its ItemBounds at
// kItemTemplateSide, the same view of the product that an item's template
// takes of the item (the tight box of its pixels, squared).
data::GrayImage ProductTemplate(const data::GrayImage& product);

// How much `item_template` looks like the very product of
// `product_template` (both kItemTemplateSide square): the normalised
// cross-correlation of the two over the product's mask (its template's
// pixels above kItemMaskThreshold), the item template shifted by up to
// kTemplateMaxShift pixels each way to absorb box and rounding jitter, the
// best shift kept. In [-1, 1]; 1 for the same image under any brightness
// gain and offset (so the snaps' brightness jitter costs nothing), whatever
// the background outside the mask shows; 0 when either side is uniform over
// the mask or the mask has under 16 pixels.
float TemplateSimilarity(const data::GrayImage& product_template, const data::GrayImage& item_template);

// categories/<i>_<name>/templates.u8, little-endian:
//   char[8]  "DTTMPL01"
//   int32    side (24)      int32 reserved (0)
//   int64    count (the category's items, as its manifest)
//   count x int64             item ids, in the index's item order
//   count x side*side x uint8  the templates, in the same order
inline constexpr const char* kItemTemplateFile = "templates.u8";

// ---- queries ---------------------------------------------------------------------

struct SnapIndexOpenOptions {
  std::string index_dir;
  // Torch threads; 0 = every core.
  int threads = 0;
};

struct SnapQueryOptions {
  // Snaps to return (1..kMaxQueryK of searcher.h).
  int k = 10;
  // Search this category (its name) instead of predicting it.
  std::string category;
  // The template similarity's weight w in the score (query step 4), in
  // [0, 1]; -1 = the index's setting (SnapIndexOptions::pixel_weight).
  float pixel_weight = -1;
  // When templates are compared: embedding candidates re-ranked per
  // category, at least (at most the category's item count). Default: 1024.
  int rerank_depth = 1024;
  // The instance bonus g (query step 4): instance_weight *
  // clamp((template similarity - instance_threshold) / (1 - instance_threshold), 0, 1)
  // is added to every candidate's score; in [0, 1], 0 turns it off;
  // instance_threshold in [0, 1).
  float instance_weight = 1.0f;
  float instance_threshold = 0.7f;
  // Only items whose template similarity is within instance_margin of the
  // best of the query's candidates get the bonus (a large margin: every
  // item over the threshold). >= 0.
  float instance_margin = 0.05f;
};

// An item of a snap, as indexed.
struct IndexedItem {
  data::SnapBox box;
  int category = 0;
  float score = 1;  // detection score (1 for ground-truth and whole-snap items)
};

struct IndexedSnap {
  int64_t id = 0;         // the snap's id (generator key or COCO image id)
  std::string file_name;  // relative to the snap directory; empty for snaps built in memory
  std::vector<IndexedItem> items;
};

struct SnapMatch {
  int64_t snap_id = 0;
  int64_t snap_ordinal = 0;  // position in SnapIndex::snaps()
  std::string file_name;
  // The matched item: its id in the category index, box, category and
  // detection score, and its score (query step 4: the combined score; the
  // embedding cosine when no template is compared) with its two parts
  // (pixel_similarity: the template similarity; 0, not computed, when the
  // pixel and instance weights are both 0).
  int64_t item_id = 0;
  IndexedItem item;
  std::string category_name;
  float similarity = 0;
  float embedding_similarity = 0;
  float pixel_similarity = 0;
  // The matched item's Fashion-MNIST class and source index, -1 when unknown.
  int fine_class = -1;
  int64_t source_index = -1;
};

struct SnapQueryResult {
  // The category searched: -1 when every category was searched.
  int category = -1;
  std::string category_name;
  // How it was chosen: "given", "predicted" (then category_score is the
  // detection's score), "only" (a one-category index) or "all".
  std::string category_source;
  float category_score = 0;
  // Best first, distinct snaps.
  std::vector<SnapMatch> matches;
  double predict_seconds = 0;
  double embed_seconds = 0;
  double search_seconds = 0;
};

class SnapIndex {
 public:
  ~SnapIndex();

  // Reads snap_index.json and opens every category's index (searcher.h: the
  // digest and size checks), its item templates and the detector.
  // NotFound for a directory that is not a snap index (a build that did not
  // finish leaves none); Corruption for a snap_index.json that does not
  // parse or disagrees with the category indexes, or a templates.u8 that is
  // missing, truncated or disagrees with its category's item count or ids
  // (each naming the file). An index written before item templates (with
  // the old 14x14 pixel descriptors or none) opens with pixel_weight() 0.
  static Status Open(const SnapIndexOpenOptions& options, std::unique_ptr<SnapIndex>* out);

  // The top-k snaps for one product image (steps 1-4 above).
  // InvalidArgument for k out of range, an empty image, an unknown
  // category name, a pixel_weight outside [0, 1] (other than -1), an
  // instance_weight outside [0, 1], an instance_threshold outside [0, 1) or
  // a negative rerank_depth; FailedPrecondition for a pixel or instance
  // weight > 0 on an index without item templates (query it with both 0,
  // or build it again).
  Status Query(const data::GrayImage& product, const SnapQueryOptions& options, SnapQueryResult* result) const;

  // The same for many products at once (detector and embedders run in
  // batches); results[i] answers products[i].
  Status QueryBatch(const std::vector<data::GrayImage>& products, const SnapQueryOptions& options,
                    std::vector<SnapQueryResult>* results) const;

  // The detector's category for a product image (step 2) and its score.
  // FailedPrecondition when the index has no detector.
  Status PredictCategory(const data::GrayImage& product, int* category, float* score) const;

  // The snap's image, read from the snap directory the index was built from.
  // FailedPrecondition for an index built from snaps in memory; NotFound
  // when the file has gone.
  Status ReadSnapImage(int64_t snap_ordinal, data::GrayImage* image) const;

  SnapBoxes boxes() const { return boxes_; }
  bool normalize_crops() const { return normalize_crops_; }
  // The index's pixel weight (SnapIndexOptions::pixel_weight).
  float pixel_weight() const { return pixel_weight_; }
  const std::vector<std::string>& categories() const { return categories_; }
  const std::vector<IndexedSnap>& snaps() const { return snaps_; }
  bool has_detector() const;
  // Items indexed per category.
  int64_t items(int category) const;
  const std::string& snap_dir() const { return snap_dir_; }
  const std::string& dir() const { return dir_; }
  // "DETECTED snap index of 1000 snaps, 3931 items (tops 1650, ...), detector ...".
  std::string Describe() const;

 private:
  struct Detector;
  SnapIndex() = default;
  // Step 2 for 28x28 inputs, in batches: the category (-1 when nothing was
  // found) and score of each.
  Status PredictCategories(const std::vector<data::GrayImage>& inputs, std::vector<int>* categories,
                           std::vector<float>* scores) const;

  std::string dir_;
  SnapBoxes boxes_ = SnapBoxes::kDetected;
  bool normalize_crops_ = true;
  std::vector<std::string> categories_;
  std::vector<std::unique_ptr<Searcher>> searchers_;  // per category; null without items
  float pixel_weight_ = 0;
  // Per category: item id -> row, and rows of kItemTemplatePixels bytes.
  struct Pixels;
  std::vector<std::unique_ptr<Pixels>> pixels_;  // per category; null without items
  std::unique_ptr<Detector> detector_;
  std::vector<IndexedSnap> snaps_;
  std::string snap_dir_;
  int snap_rows_ = 0;
  int snap_cols_ = 0;
  std::string description_;
};

// ---- pictures --------------------------------------------------------------------

struct SnapPictureOptions {
  // Snaps per row; further snaps wrap onto new rows.
  int columns = 5;
  // Pixels between tiles and around the picture.
  int gap = 8;
  // Box colours (R, G, B) and line widths: the matched item, the other
  // items indexed in the snap.
  uint8_t match_rgb[3] = {0, 220, 0};
  uint8_t other_rgb[3] = {255, 140, 0};
  int match_line = 2;
  int other_line = 1;
};

// A picture of a query's answer: the product on the left (enlarged to the
// snaps' height), the result's snaps to its right in rank order, each with
// the matched box in match_rgb, the other items' boxes in other_rgb, and a
// bar under it as long as the similarity (0 to 1) is high. `snap_images[i]`
// is the image of result.matches[i] (SnapIndex::ReadSnapImage).
// InvalidArgument when the counts differ or an image is empty.
Status DrawSnapResults(const data::GrayImage& product, const SnapQueryResult& result,
                       const std::vector<const IndexedSnap*>& snaps, const std::vector<data::GrayImage>& snap_images,
                       const SnapPictureOptions& options, data::RgbImage* out);

}  // namespace dtrain::indexer
