#include "dtrain/common/status.h"

#include <gtest/gtest.h>

namespace dtrain {
namespace {

TEST(StatusTest, DefaultIsOk) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.ToString(), "OK");
}

TEST(StatusTest, CarriesCodeAndMessage) {
  Status s = Status::Corruption("tensor fc.weight: CRC mismatch");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), Status::Code::kCorruption);
  EXPECT_EQ(s.ToString(), "Corruption: tensor fc.weight: CRC mismatch");
  EXPECT_EQ(s.WithContext("checkpoint 12").ToString(), "Corruption: checkpoint 12: tensor fc.weight: CRC mismatch");
  EXPECT_TRUE(Status::OK().WithContext("x").ok());
}

StatusOr<int> Half(int v) {
  if (v % 2) return Status::InvalidArgument("odd: " + std::to_string(v));
  return v / 2;
}

Status UseHalf(int v, int* out) {
  DTRAIN_ASSIGN_OR_RETURN(*out, Half(v));
  return Status::OK();
}

TEST(StatusTest, StatusOrPropagates) {
  int out = 0;
  EXPECT_TRUE(UseHalf(8, &out).ok());
  EXPECT_EQ(out, 4);
  Status s = UseHalf(3, &out);
  EXPECT_EQ(s.code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(s.message(), "odd: 3");
  StatusOr<int> bad = Status::OK();  // a programming error, reported as Internal
  EXPECT_EQ(bad.status().code(), Status::Code::kInternal);
}

}  // namespace
}  // namespace dtrain
