#include "dtrain/common/progress.h"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "dtrain/common/env.h"

namespace dtrain {

ProgressBar::ProgressBar(ProgressOptions options) : opt_(std::move(options)) {
  if (!opt_.clock) {
    opt_.clock = [] {
      return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
    };
  }
  switch (opt_.mode) {
    case ProgressOptions::Mode::kTty: tty_ = true; break;
    case ProgressOptions::Mode::kLines: tty_ = false; break;
    case ProgressOptions::Mode::kAuto:
      tty_ = (isatty(STDERR_FILENO) == 1 || std::strcmp(env::Get(env::kProgress, "1"), "tty") == 0) &&
             std::strcmp(env::Get(env::kProgress, "1"), "0") != 0;
      break;
  }
  if (!opt_.sink) {
    if (tty_) {
      opt_.sink = [](const std::string& s) {
        std::fputs(s.c_str(), stderr);
        std::fflush(stderr);
      };
    } else {
      opt_.sink = [](const std::string& s) { spdlog::info("{}", s); };
    }
  }
  start_ = opt_.clock();
}

ProgressBar::~ProgressBar() { Finish(); }

std::string ProgressBar::FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long s = std::lround(seconds);
  char buf[32];
  if (s < 60) {
    std::snprintf(buf, sizeof buf, "%lds", s);
  } else if (s < 3600) {
    std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s % 3600) / 60);
  }
  return buf;
}

std::string ProgressBar::Render() const {
  std::string line = opt_.label;
  const double elapsed = opt_.clock() - start_;
  if (opt_.total > 0) {
    const double frac = std::clamp(static_cast<double>(done_) / static_cast<double>(opt_.total), 0.0, 1.0);
    const int filled = static_cast<int>(frac * opt_.bar_width);
    if (!line.empty()) line += " ";
    line += "[" + std::string(filled, '#') + std::string(opt_.bar_width - filled, '.') + "] ";
    char buf[64];
    std::snprintf(buf, sizeof buf, "%lld/%lld %3d%%", static_cast<long long>(done_),
                  static_cast<long long>(opt_.total), static_cast<int>(frac * 100));
    line += buf;
  } else {
    line += (line.empty() ? "" : " ") + std::to_string(done_);
  }
  for (const auto& [k, v] : fields_) line += "  " + k + " " + v;
  line += "  elapsed " + FormatDuration(elapsed);
  if (opt_.total > 0 && done_ > 0 && done_ < opt_.total && elapsed > 0) {
    const double rate = static_cast<double>(done_) / elapsed;
    line += "  ETA " + FormatDuration(static_cast<double>(opt_.total - done_) / rate);
  }
  return line;
}

void ProgressBar::Update(int64_t done, const Fields& fields) {
  if (finished_) return;
  done_ = done;
  fields_ = fields;
  const double now = opt_.clock();
  const double interval = tty_ ? opt_.tty_refresh_s : opt_.log_interval_s;
  if (now - last_emit_ >= interval) {
    last_emit_ = now;
    Emit(false);
  }
}

void ProgressBar::Finish() {
  if (finished_) return;
  finished_ = true;
  Emit(true);
}

void ProgressBar::Emit(bool final) {
  const std::string line = Render();
  if (tty_) {
    opt_.sink("\r" + line + "\033[K" + (final ? "\n" : ""));
  } else {
    opt_.sink(line);
  }
}

}  // namespace dtrain
