// bench/data_pipeline: how fast the data layer feeds a trainer on one core.
//
// Measures, per image: reading the gzip IDX files, sampling, augmentation
// (pad-2 crop + flip) and normalisation into a float batch. The trainer's
// reference figure (docs/benchmarks.md) is ~2,500 images/s per core for the
// default embedder's forward+backward, so batch preparation must stay far
// above that to be off the critical path.
//
//   build/bin/bench_data_pipeline                     # table on stdout
//   build/bin/bench_data_pipeline --benchmark_out=bench/results/data_pipeline.json
// launch/bench.sh data_pipeline does the second.
#include <benchmark/benchmark.h>

#include <cstdio>
#include <memory>

#include "dtrain/data/fashion_mnist.h"
#include "dtrain/data/sampler.h"
#include "dtrain/data/transforms.h"

namespace {

using namespace dtrain::data;

const Dataset& Train() {
  static const Dataset* ds = [] {
    auto* d = new Dataset;
    FashionMnistOptions o;
    dtrain::Status st = LoadFashionMnist(o, d);
    if (!st.ok()) {
      std::fprintf(stderr, "%s\n", st.ToString().c_str());
      std::exit(1);
    }
    return d;
  }();
  return *ds;
}

void BM_LoadTrainSplit(benchmark::State& state) {
  for (auto _ : state) {
    Dataset d;
    FashionMnistOptions o;
    dtrain::Status st = LoadFashionMnist(o, &d);
    if (!st.ok()) state.SkipWithError(st.ToString().c_str());
    benchmark::DoNotOptimize(d.images.data());
  }
  state.SetItemsProcessed(state.iterations() * 60000);
  state.SetLabel("images/s = items_per_second");
}
BENCHMARK(BM_LoadTrainSplit)->Unit(benchmark::kMillisecond)->Iterations(3);

void BM_MakeBatch(benchmark::State& state) {
  const Dataset& ds = Train();
  const bool augment = state.range(0) != 0;
  const int batch = static_cast<int>(state.range(1));
  ShardedSampler::Options so;
  so.dataset_size = ds.size;
  so.local_batch = batch;
  so.seed = 1;
  std::unique_ptr<ShardedSampler> sampler;
  if (!ShardedSampler::Create(so, &sampler).ok()) {
    state.SkipWithError("sampler");
    return;
  }
  AugmentOptions aug;
  NormalizeOptions norm;
  std::vector<int64_t> idx, labels;
  std::vector<float> pixels;
  for (auto _ : state) {
    if (!sampler->Next(&idx)) {
      sampler->StartEpoch(sampler->state().epoch + 1);
      sampler->Next(&idx);
    }
    MakeBatch(ds, idx, 1, sampler->state().epoch, augment ? &aug : nullptr, norm, &pixels, &labels);
    benchmark::DoNotOptimize(pixels.data());
  }
  state.SetItemsProcessed(state.iterations() * batch);
}
BENCHMARK(BM_MakeBatch)->ArgNames({"augment", "batch"})->Args({0, 256})->Args({1, 256})->Args({1, 1024});

void BM_PKSamplerNext(benchmark::State& state) {
  const Dataset& ds = Train();
  PKSampler::Options o;
  o.labels.assign(ds.labels.begin(), ds.labels.end());
  o.num_classes = 10;
  o.p = 8;
  o.k = 16;
  o.seed = 1;
  std::unique_ptr<PKSampler> sampler;
  if (dtrain::Status st = PKSampler::Create(o, &sampler); !st.ok()) {
    state.SkipWithError(st.ToString().c_str());
    return;
  }
  std::vector<int64_t> idx;
  for (auto _ : state) {
    if (!sampler->Next(&idx)) {
      sampler->StartEpoch(sampler->state().epoch + 1);
      sampler->Next(&idx);
    }
    benchmark::DoNotOptimize(idx.data());
  }
  state.SetItemsProcessed(state.iterations() * 128);
}
BENCHMARK(BM_PKSamplerNext);

}  // namespace

BENCHMARK_MAIN();
