// dtrain-indexer: the index builder as a long-running gRPC service.
//   DTRAIN_JOB_TOKEN=... dtrain-indexer [--port 5060] [--bind 127.0.0.1] [--index DIR]
// Prints "listening on HOST:PORT" once it accepts calls (tests and launchers
// read the port from that line when they pass --port 0).
#include <CLI/CLI.hpp>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <thread>

#include "dtrain/common/logging.h"
#include "dtrain/common/port_file.h"
#include "dtrain/common/rpc.h"
#include "dtrain/indexer/service.h"

namespace {
std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dtrain-indexer: builds retrieval indexes from dtrain models and answers queries over gRPC "
               "(service IndexBuilder in proto/dtrain/indexer.proto). Every call must carry the job token, "
               "given to this process in DTRAIN_JOB_TOKEN or --token-file.",
               "dtrain-indexer"};
  dtrain::indexer::IndexerServerOptions o;
  std::string token_file, port_file;
  app.add_option("--bind", o.bind_address, "address to listen on")->capture_default_str();
  app.add_option("--port", o.port, "port (0: pick a free one and print it)")->capture_default_str();
  app.add_option("--index", o.index_dir, "index directory to serve from the start");
  app.add_option("--data-dir", o.data_dir, "Fashion-MNIST directory")->capture_default_str();
  app.add_option("--threads", o.threads, "torch threads for embedding (0: every core)")->capture_default_str();
  app.add_option("--token-file", token_file, "file whose first line is the job token (if DTRAIN_JOB_TOKEN is unset)");
  app.add_option("--port-file", port_file, "write the port chosen to this file once listening");
  CLI11_PARSE(app, argc, argv);

  dtrain::LoggingOptions lo;
  lo.role = "indexer";
  if (dtrain::Status st = dtrain::InitLogging(lo); !st.ok()) {
    std::fprintf(stderr, "dtrain-indexer: %s\n", st.ToString().c_str());
    return 2;
  }
  if (dtrain::Status st = dtrain::rpc::LoadJobToken(token_file, &o.token); !st.ok()) {
    std::fprintf(stderr, "dtrain-indexer: %s\n", st.ToString().c_str());
    return 2;
  }
  std::unique_ptr<dtrain::indexer::IndexerServer> server;
  if (dtrain::Status st = dtrain::indexer::IndexerServer::Start(o, &server); !st.ok()) {
    std::fprintf(stderr, "dtrain-indexer: %s\n", st.ToString().c_str());
    return 1;
  }
  std::printf("dtrain-indexer listening on %s:%d\n", o.bind_address.c_str(), server->port());
  std::fflush(stdout);
  if (!port_file.empty()) {
    if (dtrain::Status st = dtrain::WritePortFile(port_file, server->port()); !st.ok()) {
      std::fprintf(stderr, "dtrain-indexer: %s\n", st.ToString().c_str());
      return 1;
    }
  }
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  server->Shutdown();
  std::printf("dtrain-indexer stopped\n");
  return 0;
}
