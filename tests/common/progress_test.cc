#include "dtrain/common/progress.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace dtrain {
namespace {

using ::testing::HasSubstr;

struct FakeClockSink {
  double now = 0;
  std::vector<std::string> out;
  ProgressOptions Options(ProgressOptions::Mode mode, int64_t total) {
    ProgressOptions o;
    o.label = "epoch 1/2";
    o.total = total;
    o.mode = mode;
    o.log_interval_s = 10;
    o.bar_width = 10;
    o.clock = [this] { return now; };
    o.sink = [this](const std::string& s) { out.push_back(s); };
    return o;
  }
};

TEST(ProgressBarTest, LinesModeWritesPeriodicLinesAndFinal) {
  FakeClockSink f;
  ProgressBar bar(f.Options(ProgressOptions::Mode::kLines, 100));
  EXPECT_FALSE(bar.tty());
  for (int i = 1; i <= 100; ++i) {
    f.now = i * 0.5;  // 50 s in all: lines at 0.5 s (first), 10.5, 20.5, 30.5, 40.5
    bar.Update(i, {{"loss", "0.5"}});
  }
  bar.Finish();
  bar.Finish();  // idempotent
  ASSERT_EQ(f.out.size(), 6u);
  EXPECT_EQ(f.out[0].find('\r'), std::string::npos);
  EXPECT_THAT(f.out[0], HasSubstr("epoch 1/2 [.........."));
  EXPECT_THAT(f.out[2], HasSubstr("41/100  41%  loss 0.5  elapsed 21s  ETA 30s"));
  EXPECT_THAT(f.out.back(), HasSubstr("[##########] 100/100 100%"));
}

TEST(ProgressBarTest, TtyModeRedrawsInPlace) {
  FakeClockSink f;
  {
    ProgressBar bar(f.Options(ProgressOptions::Mode::kTty, 4));
    f.now = 1;
    bar.Update(2);
  }  // destructor finishes
  ASSERT_EQ(f.out.size(), 2u);
  EXPECT_EQ(f.out[0].substr(0, 1), "\r");
  EXPECT_THAT(f.out[0], HasSubstr("[#####.....] 2/4  50%"));
  EXPECT_EQ(f.out[1].back(), '\n');
}

TEST(ProgressBarTest, UnknownTotalShowsCount) {
  FakeClockSink f;
  ProgressBar bar(f.Options(ProgressOptions::Mode::kLines, 0));
  bar.Update(7);
  EXPECT_THAT(bar.Render(), HasSubstr("epoch 1/2 7"));
  EXPECT_THAT(bar.Render(), ::testing::Not(HasSubstr("ETA")));
}

TEST(ProgressBarTest, FormatsDurations) {
  EXPECT_EQ(ProgressBar::FormatDuration(12.4), "12s");
  EXPECT_EQ(ProgressBar::FormatDuration(185), "3m05s");
  EXPECT_EQ(ProgressBar::FormatDuration(3725), "1h02m");
  EXPECT_EQ(ProgressBar::FormatDuration(-1), "?");
}

}  // namespace
}  // namespace dtrain
