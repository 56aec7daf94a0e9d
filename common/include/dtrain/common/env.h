// Every environment variable dtrain reads, named once here (and read once, by
// the component that owns it). Job settings never come from the environment:
// they come from the JobConfig.
#pragma once

namespace dtrain::env {

// Log level for every process: trace, debug, info, warn, error, off.
inline constexpr const char* kLogLevel = "DTRAIN_LOG_LEVEL";
// "0" turns the TTY progress bar off (periodic log lines instead); "tty"
// turns it on although stderr is not a terminal. The coordinator removes it
// from the processes it starts (it draws the job's progress itself).
inline constexpr const char* kProgress = "DTRAIN_PROGRESS";
// Where launch/install-deps.sh put the torch venv (used by scripts only).
inline constexpr const char* kTorchDir = "DTRAIN_TORCH_DIR";

// Set by the launchers of MPI jobs (Open MPI's mpirun; PMI and PMIx based
// launchers such as srun): their presence means "started by mpirun".
inline constexpr const char* kOmpiWorldSize = "OMPI_COMM_WORLD_SIZE";
inline constexpr const char* kPmiSize = "PMI_SIZE";
inline constexpr const char* kPmixRank = "PMIX_RANK";
// Open MPI's rank of this process and the number of ranks on its node (read
// for the log tag before MPI is initialised, and to size thread pools).
inline constexpr const char* kOmpiWorldRank = "OMPI_COMM_WORLD_RANK";
inline constexpr const char* kOmpiLocalSize = "OMPI_COMM_WORLD_LOCAL_SIZE";

// Open MPI, in an MPMD launch: this rank's program (0, 1, ...) and the rank
// counts of all programs ("2 2").
inline constexpr const char* kOmpiAppNum = "OMPI_MCA_orte_app_num";
inline constexpr const char* kOmpiAppProcs = "OMPI_APP_CTX_NUM_PROCS";
// Addresses (HOST:PORT,...) of running dtrain-ps shards for one async worker
// started without mpirun.
inline constexpr const char* kPsAddresses = "DTRAIN_PS_ADDRESSES";
// The job token every dtrain RPC must carry (common/rpc.h). Launchers give it
// to the processes they start through this variable, never on a command line
// (where `ps` would show it).
inline constexpr const char* kJobToken = "DTRAIN_JOB_TOKEN";

// Set by the coordinator's launchers (coordinator/membership.h): where the
// coordinator listens (HOST:PORT), the job's id, and the directory for the
// per-process log files (<run dir>/logs).
inline constexpr const char* kCoordinator = "DTRAIN_COORDINATOR";
inline constexpr const char* kJobId = "DTRAIN_JOB_ID";
inline constexpr const char* kLogDir = "DTRAIN_LOG_DIR";

// Returns the variable's value, or `fallback` when it is unset or empty.
const char* Get(const char* name, const char* fallback);

}  // namespace dtrain::env
