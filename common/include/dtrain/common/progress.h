// A progress display for long work (training epochs, embedding a gallery).
//
// On a terminal it redraws one line in place:
//   epoch 2/6 [########........] 412/938  44%  loss 0.412  2480 img/s  ETA 0m21s
// Anywhere else (a log file, CI, mpirun's forwarded output) it writes one
// plain line every `log_interval_s` and one at the end, so logs stay readable.
//
// Thread-safety: one ProgressBar is driven by one thread.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace dtrain {

struct ProgressOptions {
  enum class Mode {
    kAuto,   // kTty when the output is a terminal and DTRAIN_PROGRESS != 0, else kLines
    kTty,    // redraw one line
    kLines,  // periodic lines
  };
  // Shown first, e.g. "epoch 2/6".
  std::string label;
  // Units of work in all; 0 when unknown (no bar, percentage or ETA).
  int64_t total = 0;
  Mode mode = Mode::kAuto;
  // Minimum seconds between redraws on a terminal. Default: 0.1.
  double tty_refresh_s = 0.1;
  // Seconds between lines in kLines mode. Default: 10.
  double log_interval_s = 10;
  // Width of the bar in characters. Default: 24.
  int bar_width = 24;
  // Receives the text. Default: stderr for kTty ("\r" redraws), spdlog::info
  // for kLines.
  std::function<void(const std::string&)> sink;
  // Seconds from an arbitrary origin. Default: std::chrono::steady_clock.
  std::function<double()> clock;
};

class ProgressBar {
 public:
  using Fields = std::vector<std::pair<std::string, std::string>>;

  explicit ProgressBar(ProgressOptions options);
  ~ProgressBar();  // calls Finish() if it was not called

  // `done` units are complete; `fields` are shown after the counts.
  void Update(int64_t done, const Fields& fields = {});
  // Changes the total (e.g. once it becomes known).
  void SetTotal(int64_t total) { opt_.total = total; }
  // Writes the final state (and the newline on a terminal). Idempotent.
  void Finish();

  // The line for the current state, without control characters.
  std::string Render() const;

  bool tty() const { return tty_; }

  // "12s", "3m05s", "1h02m".
  static std::string FormatDuration(double seconds);

 private:
  void Emit(bool final);

  ProgressOptions opt_;
  bool tty_ = false;
  bool finished_ = false;
  double start_ = 0;
  double last_emit_ = -1e300;
  int64_t done_ = 0;
  Fields fields_;
};

}  // namespace dtrain
