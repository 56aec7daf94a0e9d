// A user's client of a running coordinator (`dtrain submit|status|stop|logs
// --coordinator HOST:PORT`). Every call carries the coordinator's token.
//
// Thread-safety: calls may be made from several threads.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "dtrain/common/status.h"
#include "dtrain/coordinator.pb.h"

namespace dtrain::coordinator {

class CoordinatorClient {
 public:
  // Does not contact the coordinator; the first call says whether it can be
  // reached (Unavailable: "cannot reach the coordinator at HOST:PORT ...").
  static std::unique_ptr<CoordinatorClient> Create(const std::string& address, const std::string& token);
  ~CoordinatorClient();

  Status Submit(const SubmitRequest& request, SubmitReply* reply);
  // Every job (id empty) or one.
  Status Jobs(const std::string& id, std::vector<JobRecord>* jobs);
  // Waits (up to a minute) until the job's processes have ended.
  Status Stop(const std::string& id, JobState* state);
  Status ReadLog(const LogsRequest& request, LogsReply* reply);

 private:
  struct Impl;
  explicit CoordinatorClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dtrain::coordinator
