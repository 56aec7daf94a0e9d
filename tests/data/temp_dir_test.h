// A test fixture whose tests each get a fresh directory under /tmp (mkdtemp),
// removed afterwards. Shared by the data tests.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <string>
#include <system_error>

namespace dtrain::data::testing {

class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = "/tmp/dtrain_data_test_" + std::string(6, 'X');  // mkdtemp's template
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  std::string dir_;
};

}  // namespace dtrain::data::testing
