// The port file of a service started with --port 0: written once the server
// listens (the number and a newline, renamed into place so that a reader
// never sees half of it). Scripts and tests wait for it to learn the port.
#pragma once

#include <string>

#include "dtrain/common/status.h"

namespace dtrain {

Status WritePortFile(const std::string& path, int port);

}  // namespace dtrain
