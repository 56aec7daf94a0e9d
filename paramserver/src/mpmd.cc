#include "dtrain/paramserver/mpmd.h"

#include <mpi.h>

#include <chrono>
#include <climits>
#include <cstring>
#include <thread>

namespace dtrain::paramserver::mpmd {
namespace {

constexpr int kAddressBytes = 256;

MPI_Comm g_shards = MPI_COMM_NULL;

std::string MpiError(int rc) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, buf, &len);
  return std::string(buf, static_cast<size_t>(len));
}

// Both sides: the world rank of shard 0 (INT_MAX when there are no shards),
// then the shard count and the addresses from it.
Status Broadcast(bool is_shard, std::vector<std::string>* addresses, std::vector<char>* table) {
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  int mine = is_shard ? world_rank : INT_MAX;
  int root = INT_MAX;
  int rc = MPI_Allreduce(&mine, &root, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (rc != MPI_SUCCESS) return Status::Internal("MPI_Allreduce (finding shard 0): " + MpiError(rc));
  if (root == INT_MAX) {
    return Status::FailedPrecondition(
        "parallelism.async needs parameter-server ranks in the same mpirun: "
        "mpirun -np S dtrain-ps --config JOB : -np N dtrain-worker --config JOB (dtrain run does this)");
  }
  int count = static_cast<int>(table->size() / kAddressBytes);
  rc = MPI_Bcast(&count, 1, MPI_INT, root, MPI_COMM_WORLD);
  if (rc != MPI_SUCCESS) return Status::Internal("MPI_Bcast (shard count): " + MpiError(rc));
  table->resize(static_cast<size_t>(count) * kAddressBytes);
  rc = MPI_Bcast(table->data(), count * kAddressBytes, MPI_CHAR, root, MPI_COMM_WORLD);
  if (rc != MPI_SUCCESS) return Status::Internal("MPI_Bcast (shard addresses): " + MpiError(rc));
  addresses->clear();
  for (int i = 0; i < count; ++i) {
    const char* a = table->data() + static_cast<size_t>(i) * kAddressBytes;
    addresses->emplace_back(a, strnlen(a, kAddressBytes));
  }
  return Status::OK();
}

}  // namespace

Status ShardJoin(int* shard, int* num_shards) {
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  int rc = MPI_Comm_split(MPI_COMM_WORLD, kShardColor, world_rank, &g_shards);
  if (rc != MPI_SUCCESS) return Status::Internal("MPI_Comm_split (shards): " + MpiError(rc));
  MPI_Comm_rank(g_shards, shard);
  MPI_Comm_size(g_shards, num_shards);
  return Status::OK();
}

Status ShardPublish(const std::string& address) {
  if (g_shards == MPI_COMM_NULL) return Status::FailedPrecondition("ShardPublish before ShardJoin");
  if (address.size() >= static_cast<size_t>(kAddressBytes)) {
    return Status::InvalidArgument("shard address '" + address + "' is too long");
  }
  int shard = 0, n = 0;
  MPI_Comm_rank(g_shards, &shard);
  MPI_Comm_size(g_shards, &n);
  char mine[kAddressBytes] = {};
  std::memcpy(mine, address.data(), address.size());
  std::vector<char> table(shard == 0 ? static_cast<size_t>(n) * kAddressBytes : 0);
  int rc = MPI_Gather(mine, kAddressBytes, MPI_CHAR, table.data(), kAddressBytes, MPI_CHAR, 0, g_shards);
  if (rc != MPI_SUCCESS) return Status::Internal("MPI_Gather (shard addresses): " + MpiError(rc));
  std::vector<std::string> all;
  return Broadcast(true, &all, &table);
}

Status WorkerReceive(std::vector<std::string>* addresses) {
  std::vector<char> table;
  return Broadcast(false, addresses, &table);
}

Status JobDone(int poll_ms) {
  MPI_Request req;
  int rc = MPI_Ibarrier(MPI_COMM_WORLD, &req);
  if (rc != MPI_SUCCESS) return Status::Internal("MPI_Ibarrier (end of job): " + MpiError(rc));
  while (true) {
    int done = 0;
    rc = MPI_Test(&req, &done, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) return Status::Internal("MPI_Test (end of job): " + MpiError(rc));
    if (done) return Status::OK();
    std::this_thread::sleep_for(std::chrono::milliseconds(poll_ms));
  }
}

}  // namespace dtrain::paramserver::mpmd
