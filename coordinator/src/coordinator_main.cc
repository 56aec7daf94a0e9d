// dtrain-coordinator: the job coordinator as a long-running service
// (coordinator/coordinator.h). Users submit, watch and stop jobs with
//   dtrain submit CONFIG --coordinator HOST:PORT --token-file STATE_DIR/token
//   dtrain status | stop JOB | logs JOB --coordinator HOST:PORT ...
// Its job table lives in STATE_DIR (RocksDB): started again on the same
// directory, it relaunches the jobs that were not finished, from their
// newest checkpoints. SIGTERM or SIGINT ends it (and its jobs' processes;
// the jobs keep their state for the next start).
#include <signal.h>
#include <sys/stat.h>

#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include "dtrain/common/env.h"
#include "dtrain/common/logging.h"
#include "dtrain/common/port_file.h"
#include "dtrain/common/rpc.h"
#include "dtrain/coordinator/coordinator.h"
#include "dtrain/coordinator/index_handoff.h"

namespace {

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop = true; }

// The users' token: DTRAIN_JOB_TOKEN, --token-file, else a new one written
// to STATE_DIR/token (mode 0600) for the users of this machine's account.
dtrain::Status UsersToken(const std::string& token_file, const std::string& state_dir, std::string* token) {
  if (dtrain::rpc::LoadJobToken(token_file, token).ok()) return dtrain::Status::OK();
  if (!token_file.empty()) return dtrain::rpc::LoadJobToken(token_file, token);
  const std::string path = state_dir + "/token";
  if (dtrain::rpc::LoadJobToken(path, token).ok()) return dtrain::Status::OK();
  *token = dtrain::rpc::NewJobToken();
  std::error_code ec;
  std::filesystem::create_directories(state_dir, ec);
  {
    std::ofstream out(path, std::ios::trunc);
    out << *token << "\n";
    if (!out) return dtrain::Status::IOError("cannot write the token file " + path);
  }
  chmod(path.c_str(), 0600);
  return dtrain::Status::OK();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dtrain-coordinator: the dtrain job coordinator as a service. It launches submitted jobs (local "
               "processes or mpirun), tracks their processes by registration and heartbeats, restarts failed jobs "
               "from their newest checkpoint, hands finished models to the index builder, and keeps its job table "
               "in STATE_DIR so that it recovers its jobs when restarted.",
               "dtrain-coordinator"};
  std::string state_dir = "coordinator_state", bind = "127.0.0.1", port_file, token_file;
  int port = 0;
  app.add_option("--state-dir", state_dir, "job table (RocksDB), job configs and the token")->capture_default_str();
  app.add_option("--bind", bind, "address to listen on (another than 127.0.0.1 exposes it: keep the token safe)")
      ->capture_default_str();
  app.add_option("--port", port, "port (default: a free one; see --port-file)");
  app.add_option("--port-file", port_file, "write the port to this file once listening");
  app.add_option("--token-file", token_file,
                 "file with the users' token (default: $DTRAIN_JOB_TOKEN, else STATE_DIR/token, made if missing)");
  CLI11_PARSE(app, argc, argv);

  dtrain::LoggingOptions lo;
  lo.role = "coordinator";
  lo.file = state_dir + "/coordinator.log";
  if (dtrain::Status st = dtrain::InitLogging(lo); !st.ok()) {
    std::fprintf(stderr, "dtrain-coordinator: %s\n", st.ToString().c_str());
    return 2;
  }
  dtrain::coordinator::CoordinatorOptions o;
  o.state_dir = std::filesystem::absolute(state_dir).string();
  o.bind_address = bind;
  o.port = port;
  o.hand_off = dtrain::coordinator::IndexHandOff(/*progress=*/false);
  if (dtrain::Status st = UsersToken(token_file, o.state_dir, &o.token); !st.ok()) {
    std::fprintf(stderr, "dtrain-coordinator: %s\n", st.ToString().c_str());
    return 2;
  }
  // The signals wait for the main thread; no other thread takes them.
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  std::unique_ptr<dtrain::coordinator::Coordinator> c;
  if (dtrain::Status st = dtrain::coordinator::Coordinator::Start(o, &c); !st.ok()) {
    std::fprintf(stderr, "dtrain-coordinator: %s\n", st.ToString().c_str());
    return 1;
  }
  const std::string address = c->address();
  if (!port_file.empty()) {
    const int p = std::stoi(address.substr(address.rfind(':') + 1));
    if (dtrain::Status st = dtrain::WritePortFile(port_file, p); !st.ok()) {
      std::fprintf(stderr, "dtrain-coordinator: %s\n", st.ToString().c_str());
      return 1;
    }
  }
  spdlog::info("listening on {}; state in {}; users' token in {}", address, o.state_dir,
               token_file.empty() ? o.state_dir + "/token (or $DTRAIN_JOB_TOKEN)" : token_file);
  while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  spdlog::info("stopping: the jobs' processes end; unfinished jobs resume when a coordinator starts on {}",
               o.state_dir);
  c.reset();
  return 0;
}
