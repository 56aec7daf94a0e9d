// CRC32C: the Castagnoli CRC (reflected polynomial 0x82F63B78), the checksum of
// every tensor and section in the checkpoint store.
//
// Extend() picks, once per process, the SSE4.2 crc32 instruction when the CPU
// has it (checked at run time with __builtin_cpu_supports) and a table-driven
// implementation otherwise; both give the same values.
//
// Check values: Value("123456789", 9) == 0xE3069283; 32 zero bytes: 0x8A9136AA.
//
// Thread-safety: all functions are pure and may be called from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace dtrain::crc32c {

// Returns the CRC32C of A + data[0, n), where `crc` is the CRC32C of A.
// Extend(0, ...) starts a new checksum.
uint32_t Extend(uint32_t crc, const void* data, size_t n);

// The CRC32C of data[0, n).
inline uint32_t Value(const void* data, size_t n) { return Extend(0, data, n); }
inline uint32_t Value(std::string_view s) { return Extend(0, s.data(), s.size()); }

// True when Extend uses the SSE4.2 instruction.
bool HardwareAccelerated();

namespace internal {
// The two implementations, exposed for tests and the benchmark.
uint32_t ExtendTable(uint32_t crc, const void* data, size_t n);
// Precondition: HardwareAccelerated().
uint32_t ExtendSse42(uint32_t crc, const void* data, size_t n);
}  // namespace internal

}  // namespace dtrain::crc32c
