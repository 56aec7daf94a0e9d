// `dtrain version`: what this binary was built with and what it finds at run time.
#include <faiss/Index.h>
#include <google/protobuf/stubs/common.h>
#include <grpcpp/grpcpp.h>
#include <mpi.h>
#include <rocksdb/version.h>
#include <spdlog/version.h>
#include <torch/torch.h>
#ifdef DTRAIN_HAVE_NCCL
#include <nccl.h>
#endif

#include <cstdio>
#include <string>

#include "dtrain/coordinator/cli.h"

namespace dtrain::cli {
namespace {

void PrintVersions() {
  std::printf("dtrain      %s\n", DTRAIN_VERSION);
  std::printf("LibTorch    %s (PyPI torch wheel)\n", TORCH_VERSION);
#ifdef DTRAIN_TORCH_HAS_CUDA
  const bool cuda = torch::cuda::is_available();
  std::printf("CUDA        built in; %s\n",
              cuda ? (std::to_string(torch::cuda::device_count()) + " GPU(s) visible").c_str()
                   : "no GPU visible (CPU workers only)");
#else
  std::printf("CUDA        not built in\n");
#endif
#ifdef DTRAIN_HAVE_NCCL
  int nccl = 0;
  ncclGetVersion(&nccl);
  std::printf("NCCL        %d.%d.%d\n", nccl / 10000, (nccl / 100) % 100, nccl % 100);
#else
  std::printf("NCCL        off (see cmake output)\n");
#endif
  char mpi[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(mpi, &len);
  std::string mpi_line(mpi, static_cast<size_t>(len));
  if (size_t nl = mpi_line.find_first_of(",\n"); nl != std::string::npos) mpi_line.resize(nl);
  std::printf("MPI         %s\n", mpi_line.c_str());
  std::printf("gRPC        %s\n", grpc::Version().c_str());
  std::printf("Protobuf    %d.%d.%d\n", GOOGLE_PROTOBUF_VERSION / 1000000, (GOOGLE_PROTOBUF_VERSION / 1000) % 1000,
              GOOGLE_PROTOBUF_VERSION % 1000);
  std::printf("RocksDB     %d.%d.%d\n", ROCKSDB_MAJOR, ROCKSDB_MINOR, ROCKSDB_PATCH);
  std::printf("FAISS       %d.%d.%d\n", FAISS_VERSION_MAJOR, FAISS_VERSION_MINOR, FAISS_VERSION_PATCH);
  std::printf("spdlog      %d.%d.%d\n", SPDLOG_VER_MAJOR, SPDLOG_VER_MINOR, SPDLOG_VER_PATCH);
  std::printf("intra-op threads %d\n", torch::get_num_threads());
}

}  // namespace

void AddVersionCommand(CLI::App& app, int* exit_code) {
  CLI::App* version = app.add_subcommand("version", "print dtrain's version and the libraries it was built with");
  version->callback([] { PrintVersions(); });
}

}  // namespace dtrain::cli
