// The coordinator with real processes: the job table on RocksDB, the gRPC
// service and its tokens, and the job protocol of coordinator.h (launch,
// registration, heartbeats, failures and restarts, stop, a restarted
// coordinator recovering its jobs) with the real dtrain-worker training tiny
// jobs on Fashion-MNIST. Faults come from outside, as in life: SIGKILL and
// SIGSTOP to a worker, a missing dataset.
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <thread>

#include "dtrain/common/rpc.h"
#include "dtrain/coordinator.grpc.pb.h"
#include "dtrain/coordinator/client.h"
#include "dtrain/coordinator/coordinator.h"
#include "dtrain/coordinator/job_table.h"
#include "dtrain/coordinator/membership.h"

namespace dtrain::coordinator {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

constexpr const char* kUserToken = "users-token-for-tests";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

class CoordinatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dtrain_coord_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    coordinator_.reset();
    fs::remove_all(dir_);
  }

  CoordinatorOptions Options() {
    CoordinatorOptions o;
    o.state_dir = (dir_ / "state").string();
    o.token = kUserToken;
    o.bin_dir = DTRAIN_BIN_DIR;
    o.poll_interval_s = 0.05;
    o.stop_grace_s = 2;
    o.hand_off = [this](const JobConfig& config, std::string* summary) {
      handed_off_.push_back(config.run_dir());
      *summary = "test double: nothing built";
      return Status::OK();
    };
    return o;
  }
  void StartCoordinator() { ASSERT_TRUE(Coordinator::Start(Options(), &coordinator_).ok()); }

  // A tiny one-worker job (LOCAL launcher) on the quickstart config.
  SubmitRequest TinyJob(int epochs, std::vector<std::string> extra = {}) {
    SubmitRequest r;
    r.set_config_text(ReadFile(std::string(DTRAIN_SOURCE_DIR) + "/configs/quickstart.textproto"));
    r.set_origin("configs/quickstart.textproto");
    for (const char* o : {"launch.workers=1", "model.widths=[8,16]", "model.embedding_dim=16", "data.train_limit=2048",
                          "data.test_limit=300", "data.batch_size=64", "training.threads=1",
                          "checkpoint.every_steps=4", "index.build_at_end=false", "launch.heartbeat_interval_s=0.2",
                          "launch.restart_backoff_s=0.1"}) {
      r.add_overrides(o);
    }
    r.add_overrides("training.epochs=" + std::to_string(epochs));
    r.add_overrides("run_dir=" + (dir_ / "run").string());
    for (const std::string& e : extra) r.add_overrides(e);
    return r;
  }

  std::string Submit(const SubmitRequest& r) {
    SubmitReply reply;
    const Status st = coordinator_->Submit(r, &reply);
    EXPECT_TRUE(st.ok()) << st.ToString();
    return reply.job_id();
  }

  JobRecord Get(const std::string& id) {
    std::vector<JobRecord> jobs;
    EXPECT_TRUE(coordinator_->Jobs(id, &jobs).ok());
    return jobs.empty() ? JobRecord() : jobs[0];
  }

  // Polls the job until `done` holds (or 120 s pass).
  JobRecord WaitUntil(const std::string& id, const std::function<bool(const JobRecord&)>& done) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (std::chrono::steady_clock::now() < deadline) {
      JobRecord r = Get(id);
      if (done(r)) return r;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    ADD_FAILURE() << "timed out waiting on job " << id << ": " << DescribeJob(Get(id));
    return Get(id);
  }

  static const ProcessInfo* Worker(const JobRecord& r, int rank) {
    for (const ProcessInfo& p : r.processes()) {
      if (p.role() == WORKER && p.rank() == rank) return &p;
    }
    return nullptr;
  }
  static int64_t WorkerStep(const JobRecord& r) {
    const ProcessInfo* w = Worker(r, 0);
    return w == nullptr ? -1 : w->progress().step();
  }

  fs::path dir_;
  std::unique_ptr<Coordinator> coordinator_;
  std::vector<std::string> handed_off_;
};

TEST(JobTableTest, RecordsAndTheJobCounterSurviveAReopen) {
  const std::string dir = (fs::temp_directory_path() / ("dtrain_jobtable_" + std::to_string(getpid()))).string();
  fs::remove_all(dir);
  {
    std::unique_ptr<JobTable> t;
    ASSERT_TRUE(JobTable::Open(dir, &t).ok());
    int64_t n = 0;
    ASSERT_TRUE(t->NextJobNumber(&n).ok());
    EXPECT_EQ(n, 1);
    ASSERT_TRUE(t->NextJobNumber(&n).ok());
    EXPECT_EQ(n, 2);
    JobRecord a, b;
    a.set_id("b-job");
    a.set_state(RUNNING);
    a.set_submitted_ms(10);
    b.set_id("a-job");
    b.set_state(COMPLETED);
    b.set_submitted_ms(20);
    ASSERT_TRUE(t->Put(a, true).ok());
    ASSERT_TRUE(t->Put(b, true).ok());
    // A second writer is refused, naming the directory.
    std::unique_ptr<JobTable> second;
    const Status st = JobTable::Open(dir, &second);
    EXPECT_FALSE(st.ok());
    EXPECT_THAT(st.message(), HasSubstr(dir));
    // A read-only view works beside the writer.
    std::unique_ptr<JobTable> ro;
    ASSERT_TRUE(JobTable::OpenReadOnly(dir, &ro).ok());
    std::vector<JobRecord> seen;
    ASSERT_TRUE(ro->List(&seen).ok());
    EXPECT_EQ(seen.size(), 2u);
  }
  std::unique_ptr<JobTable> t;
  ASSERT_TRUE(JobTable::Open(dir, &t).ok());
  std::vector<JobRecord> jobs;
  ASSERT_TRUE(t->List(&jobs).ok());
  ASSERT_EQ(jobs.size(), 2u);
  EXPECT_EQ(jobs[0].id(), "b-job");  // oldest first
  EXPECT_EQ(jobs[0].state(), RUNNING);
  EXPECT_EQ(jobs[1].state(), COMPLETED);
  JobRecord r;
  EXPECT_EQ(t->Get("nope", &r).code(), Status::Code::kNotFound);
  int64_t n = 0;
  ASSERT_TRUE(t->NextJobNumber(&n).ok());
  EXPECT_EQ(n, 3);
  t.reset();
  fs::remove_all(dir);
}

TEST_F(CoordinatorTest, CallsWithoutTheRightTokenAreRejectedAndChangeNothing) {
  StartCoordinator();
  auto stub = dtrain::Coordinator::NewStub(grpc::CreateChannel(coordinator_->address(), grpc::InsecureChannelCredentials()));
  SubmitRequest req = TinyJob(1);
  SubmitReply reply;
  {
    grpc::ClientContext ctx;  // no token
    EXPECT_EQ(stub->Submit(&ctx, req, &reply).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext ctx;
    rpc::AttachJobToken(&ctx, "not-the-token");
    EXPECT_EQ(stub->Submit(&ctx, req, &reply).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext ctx;
    StatusRequest sr;
    StatusReply s;
    EXPECT_EQ(stub->ListJobs(&ctx, sr, &s).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  std::vector<JobRecord> jobs;
  ASSERT_TRUE(coordinator_->Jobs("", &jobs).ok());
  EXPECT_TRUE(jobs.empty());

  // A job's processes need the job's token, not the users' one.
  const std::string id = Submit(TinyJob(1));
  RegisterRequest rr;
  rr.set_job_id(id);
  rr.set_role(WORKER);
  rr.set_rank(0);
  rr.set_pid(1);
  RegisterReply rreply;
  {
    grpc::ClientContext ctx;
    rpc::AttachJobToken(&ctx, kUserToken);
    EXPECT_EQ(stub->Register(&ctx, rr, &rreply).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  // With the job's token, a process the job does not have is refused.
  const std::string job_token = Get(id).token();
  rr.set_rank(7);
  {
    grpc::ClientContext ctx;
    rpc::AttachJobToken(&ctx, job_token);
    const grpc::Status st = stub->Register(&ctx, rr, &rreply);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(st.error_message(), HasSubstr("no worker of rank 7"));
  }
  // The users' client: the token is never sent back.
  auto client = CoordinatorClient::Create(coordinator_->address(), kUserToken);
  ASSERT_TRUE(client->Jobs("", &jobs).ok());
  ASSERT_EQ(jobs.size(), 1u);
  EXPECT_FALSE(jobs[0].has_token());
  for (const ProcessInfo& p : jobs[0].processes()) EXPECT_NE(p.pid(), 1);
  const JobRecord done = WaitUntil(id, [](const JobRecord& r) { return IsFinal(r.state()); });
  EXPECT_EQ(done.state(), COMPLETED) << done.reason();
}

TEST_F(CoordinatorTest, BadConfigsAreRefusedAtSubmitWithLineAndField) {
  StartCoordinator();
  SubmitRequest r = TinyJob(1);
  r.set_config_text(r.config_text() + "\nseed_typo: 3\n");
  SubmitReply reply;
  Status st = coordinator_->Submit(r, &reply);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("configs/quickstart.textproto:"));
  EXPECT_THAT(st.message(), HasSubstr("seed_typo"));
  // An unresolvable host in the hostfile.
  const std::string hostfile = (dir_ / "hosts").string();
  std::ofstream(hostfile) << "localhost slots=1\nno-such-host.invalid slots=1\n";
  st = coordinator_->Submit(TinyJob(1, {"launch.launcher=MPIRUN", "launch.workers=2", "launch.hostfile=" + hostfile}),
                            &reply);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr(hostfile + ":2: host 'no-such-host.invalid' does not resolve"));
  std::vector<JobRecord> jobs;
  ASSERT_TRUE(coordinator_->Jobs("", &jobs).ok());
  EXPECT_TRUE(jobs.empty());
  // Unreachable coordinator: a clear error.
  auto client = CoordinatorClient::Create("127.0.0.1:1", kUserToken);
  st = client->Jobs("", &jobs);
  EXPECT_EQ(st.code(), Status::Code::kUnavailable);
  EXPECT_THAT(st.message(), HasSubstr("cannot reach the coordinator at 127.0.0.1:1"));
}

TEST_F(CoordinatorTest, JobRunsRegistersReportsProgressAndIsHandedOff) {
  StartCoordinator();
  const std::string id = Submit(TinyJob(1));
  EXPECT_EQ(id, "quickstart-1");
  const JobRecord running = WaitUntil(id, [](const JobRecord& r) { return r.state() == RUNNING || IsFinal(r.state()); });
  const JobRecord done = WaitUntil(id, [](const JobRecord& r) { return IsFinal(r.state()); });
  ASSERT_EQ(done.state(), COMPLETED) << done.reason();
  EXPECT_EQ(done.restarts(), 0);
  EXPECT_EQ(done.attempt(), 1);
  const ProcessInfo* w = Worker(done, 0);
  ASSERT_NE(w, nullptr);
  EXPECT_GT(w->pid(), 0);
  EXPECT_TRUE(w->exited());
  EXPECT_TRUE(w->exit_ok());
  EXPECT_EQ(w->progress().step(), 32);  // 2048 images / 64
  EXPECT_EQ(w->progress().total_steps(), 32);
  EXPECT_GT(w->progress().images_per_sec(), 0);
  EXPECT_EQ(handed_off_, std::vector<std::string>{(dir_ / "run").string()});
  EXPECT_EQ(done.handoff(), "test double: nothing built");
  EXPECT_TRUE(fs::exists(dir_ / "run" / "model.pt"));
  EXPECT_THAT(ReadFile((dir_ / "run" / "logs" / "worker-0.log").string()), HasSubstr("Precision@1"));
  // The table on disk says the same.
  coordinator_.reset();
  std::unique_ptr<JobTable> t;
  ASSERT_TRUE(JobTable::OpenReadOnly((dir_ / "state" / "db").string(), &t).ok());
  JobRecord stored;
  ASSERT_TRUE(t->Get(id, &stored).ok());
  EXPECT_EQ(stored.state(), COMPLETED);
}

TEST_F(CoordinatorTest, KilledWorkerIsRestartedFromTheLatestCheckpoint) {
  StartCoordinator();
  const std::string id = Submit(TinyJob(4));
  // SIGKILL once the worker is past a few checkpoints (every 4 steps).
  const JobRecord r = WaitUntil(id, [](const JobRecord& j) { return WorkerStep(j) >= 18 || IsFinal(j.state()); });
  ASSERT_FALSE(IsFinal(r.state())) << "the job ended before the kill";
  const int pid = Worker(r, 0)->pid();
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  const JobRecord done = WaitUntil(id, [](const JobRecord& j) { return IsFinal(j.state()); });
  ASSERT_EQ(done.state(), COMPLETED) << done.reason();
  EXPECT_EQ(done.restarts(), 1);
  EXPECT_EQ(done.attempt(), 2);
  EXPECT_THAT(done.reason(), HasSubstr("worker-0 was killed by signal 9"));
  EXPECT_EQ(Worker(done, 0)->progress().step(), 128);
  const std::string log = ReadFile((dir_ / "run" / "logs" / "worker-0.log").string());
  EXPECT_THAT(log, HasSubstr("attempt 2"));
  EXPECT_THAT(log, HasSubstr("resuming quickstart from checkpoint"));
  EXPECT_NE(Worker(done, 0)->pid(), pid);
}

TEST_F(CoordinatorTest, StoppedWorkerIsDetectedByHeartbeatAndRestarted) {
  StartCoordinator();
  const std::string id = Submit(TinyJob(4, {"launch.heartbeat_timeout_s=3"}));
  const JobRecord r = WaitUntil(id, [](const JobRecord& j) { return WorkerStep(j) >= 10 || IsFinal(j.state()); });
  ASSERT_FALSE(IsFinal(r.state()));
  const int pid = Worker(r, 0)->pid();
  ASSERT_EQ(kill(pid, SIGSTOP), 0);  // alive but silent: a hang
  const JobRecord done = WaitUntil(id, [](const JobRecord& j) { return IsFinal(j.state()); });
  ASSERT_EQ(done.state(), COMPLETED) << done.reason();
  EXPECT_EQ(done.restarts(), 1);
  EXPECT_THAT(done.reason(), HasSubstr("sent no heartbeat for"));
  // The hung process was ended, not left behind.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_NE(kill(pid, 0), 0);
}

TEST_F(CoordinatorTest, FailureARestartCannotMendFailsTheJobAtOnce) {
  StartCoordinator();
  const std::string id = Submit(TinyJob(1, {"data.dir=" + (dir_ / "no_dataset").string()}));
  const JobRecord done = WaitUntil(id, [](const JobRecord& j) { return IsFinal(j.state()); });
  EXPECT_EQ(done.state(), FAILED);
  EXPECT_EQ(done.restarts(), 0);
  EXPECT_THAT(done.reason(), HasSubstr("no_dataset"));
  EXPECT_THAT(done.reason(), HasSubstr("a restart would fail the same way"));
  EXPECT_TRUE(handed_off_.empty());
}

TEST_F(CoordinatorTest, StopEndsEveryProcessOfTheJob) {
  StartCoordinator();
  const std::string id = Submit(TinyJob(20));
  const JobRecord r = WaitUntil(id, [](const JobRecord& j) { return WorkerStep(j) >= 2 || IsFinal(j.state()); });
  ASSERT_FALSE(IsFinal(r.state()));
  const int pid = Worker(r, 0)->pid();
  // A second job may not use the same run directory meanwhile.
  SubmitReply reply;
  const Status busy = coordinator_->Submit(TinyJob(1), &reply);
  EXPECT_EQ(busy.code(), Status::Code::kAlreadyExists);
  JobState state;
  ASSERT_TRUE(coordinator_->Stop(id, &state).ok());
  EXPECT_EQ(state, STOPPED);
  EXPECT_NE(kill(pid, 0), 0);
  EXPECT_TRUE(handed_off_.empty());
  EXPECT_EQ(Get(id).reason(), "stopped by request");
}

TEST_F(CoordinatorTest, RestartedCoordinatorRecoversItsJobTable) {
  StartCoordinator();
  const std::string done_id = Submit(TinyJob(1, {"run_dir=" + (dir_ / "first").string()}));
  WaitUntil(done_id, [](const JobRecord& j) { return IsFinal(j.state()); });
  const std::string id = Submit(TinyJob(4));
  const JobRecord r = WaitUntil(id, [](const JobRecord& j) { return WorkerStep(j) >= 18 || IsFinal(j.state()); });
  ASSERT_FALSE(IsFinal(r.state()));
  const int pid = Worker(r, 0)->pid();
  coordinator_.reset();  // the coordinator goes; its job's processes with it
  EXPECT_NE(kill(pid, 0), 0);
  StartCoordinator();  // same state directory
  EXPECT_EQ(Get(done_id).state(), COMPLETED);
  EXPECT_THAT(Get(id).reason(), HasSubstr("recovered by a restarted coordinator"));
  const JobRecord done = WaitUntil(id, [](const JobRecord& j) { return IsFinal(j.state()); });
  ASSERT_EQ(done.state(), COMPLETED) << done.reason();
  EXPECT_EQ(done.restarts(), 0);
  EXPECT_EQ(done.attempt(), 2);
  EXPECT_THAT(ReadFile((dir_ / "run" / "logs" / "worker-0.log").string()),
              HasSubstr("resuming quickstart from checkpoint"));
  // Job numbers go on from where the old coordinator left them.
  EXPECT_EQ(Submit(TinyJob(1, {"run_dir=" + (dir_ / "third").string()})), "quickstart-3");
}

}  // namespace
}  // namespace dtrain::coordinator
