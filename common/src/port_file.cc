#include "dtrain/common/port_file.h"

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace dtrain {

Status WritePortFile(const std::string& path, int port) {
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "w");
  if (f == nullptr) return Status::IOError("cannot write the port file " + tmp + ": " + std::strerror(errno));
  std::fprintf(f, "%d\n", port);
  if (std::fclose(f) != 0 || std::rename(tmp.c_str(), path.c_str()) != 0) {
    return Status::IOError("cannot write the port file " + path + ": " + std::strerror(errno));
  }
  return Status::OK();
}

}  // namespace dtrain
