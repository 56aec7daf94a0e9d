// Status: the one error type used inside dtrain.
//
// Every component boundary returns Status (or StatusOr<T>); exceptions thrown
// by LibTorch, gRPC or RocksDB are caught at the edge and converted here.
// Fatal checks (DTRAIN_CHECK) are only for programmer errors.
//
// Thread-safety: Status is a value type; distinct objects may be used from
// different threads freely.
#pragma once

#include <optional>
#include <ostream>
#include <string>
#include <utility>

namespace dtrain {

class [[nodiscard]] Status {
 public:
  enum class Code {
    kOk = 0,
    kInvalidArgument,     // bad input from a user: config, flag, file contents
    kNotFound,            // a file, key, checkpoint or name that does not exist
    kCorruption,          // stored data fails its checks (magic, CRC, sizes)
    kIOError,             // the OS refused a read or write
    kFailedPrecondition,  // the system is not in a state to do this
    kOutOfRange,          // past the end (e.g. of a file or an epoch)
    kAlreadyExists,
    kUnauthenticated,     // RPC without the job token
    kDeadlineExceeded,    // a collective or RPC timed out
    kAborted,
    kUnavailable,
    kInternal,            // a bug or an unexpected error from a dependency
  };

  // Default: OK.
  Status() = default;

  static Status OK() { return Status(); }
  static Status InvalidArgument(std::string msg) { return Status(Code::kInvalidArgument, std::move(msg)); }
  static Status NotFound(std::string msg) { return Status(Code::kNotFound, std::move(msg)); }
  static Status Corruption(std::string msg) { return Status(Code::kCorruption, std::move(msg)); }
  static Status IOError(std::string msg) { return Status(Code::kIOError, std::move(msg)); }
  static Status FailedPrecondition(std::string msg) { return Status(Code::kFailedPrecondition, std::move(msg)); }
  static Status OutOfRange(std::string msg) { return Status(Code::kOutOfRange, std::move(msg)); }
  static Status AlreadyExists(std::string msg) { return Status(Code::kAlreadyExists, std::move(msg)); }
  static Status Unauthenticated(std::string msg) { return Status(Code::kUnauthenticated, std::move(msg)); }
  static Status DeadlineExceeded(std::string msg) { return Status(Code::kDeadlineExceeded, std::move(msg)); }
  static Status Aborted(std::string msg) { return Status(Code::kAborted, std::move(msg)); }
  static Status Unavailable(std::string msg) { return Status(Code::kUnavailable, std::move(msg)); }
  static Status Internal(std::string msg) { return Status(Code::kInternal, std::move(msg)); }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }

  // "OK" or "<CodeName>: <message>".
  std::string ToString() const;

  // Returns a copy whose message is "<context>: <message>"; OK stays OK.
  Status WithContext(const std::string& context) const;

  static const char* CodeName(Code code);

 private:
  Status(Code code, std::string msg) : code_(code), message_(std::move(msg)) {}

  Code code_ = Code::kOk;
  std::string message_;
};

inline std::ostream& operator<<(std::ostream& os, const Status& s) { return os << s.ToString(); }

// A value or the Status that explains why there is none.
template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(Status status) : status_(std::move(status)) {  // NOLINT: implicit by design
    if (status_.ok()) status_ = Status::Internal("StatusOr constructed from an OK status without a value");
  }
  StatusOr(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design

  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }

  // Precondition: ok().
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }
  T& operator*() & { return *value_; }
  const T& operator*() const& { return *value_; }

 private:
  Status status_;
  std::optional<T> value_;
};

// Aborts with file:line and the message. For broken invariants only, never
// for bad input (that gets a Status).
[[noreturn]] void FatalError(const char* file, int line, const std::string& msg);

}  // namespace dtrain

#define DTRAIN_STATUS_CONCAT_INNER(a, b) a##b
#define DTRAIN_STATUS_CONCAT(a, b) DTRAIN_STATUS_CONCAT_INNER(a, b)

// Returns from the enclosing function if `expr` (a Status) is not OK.
#define DTRAIN_RETURN_IF_ERROR(expr)            \
  do {                                          \
    ::dtrain::Status _dtrain_st = (expr);       \
    if (!_dtrain_st.ok()) return _dtrain_st;    \
  } while (0)

// `lhs = value of expr` (a StatusOr), or returns its Status.
#define DTRAIN_ASSIGN_OR_RETURN(lhs, expr) \
  DTRAIN_ASSIGN_OR_RETURN_IMPL(DTRAIN_STATUS_CONCAT(_dtrain_sor_, __LINE__), lhs, expr)
#define DTRAIN_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return tmp.status();                \
  lhs = std::move(tmp).value()

// Programmer-error check: aborts with the condition and file:line.
#define DTRAIN_CHECK(cond)                                                        \
  do {                                                                            \
    if (!(cond)) ::dtrain::FatalError(__FILE__, __LINE__, "check failed: " #cond); \
  } while (0)
