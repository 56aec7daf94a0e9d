#include "dtrain/common/crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define DTRAIN_CRC32C_X86 1
#endif

namespace dtrain::crc32c {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

// Slicing-by-8 tables: kTables[k][b] is the CRC of byte b followed by k zero bytes.
struct Tables {
  uint32_t t[8][256];
};

constexpr Tables MakeTables() {
  Tables tb{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t c = b;
    for (int i = 0; i < 8; ++i) c = (c >> 1) ^ ((c & 1u) ? kPoly : 0u);
    tb.t[0][b] = c;
  }
  for (int k = 1; k < 8; ++k) {
    for (uint32_t b = 0; b < 256; ++b) tb.t[k][b] = (tb.t[k - 1][b] >> 8) ^ tb.t[0][tb.t[k - 1][b] & 0xFFu];
  }
  return tb;
}

constexpr Tables kTables = MakeTables();

inline uint64_t LoadLE64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap64(v);
#endif
  return v;
}

bool DetectSse42() {
#ifdef DTRAIN_CRC32C_X86
  return __builtin_cpu_supports("sse4.2");
#else
  return false;
#endif
}

bool HaveSse42() {
  static const bool have = DetectSse42();
  return have;
}

}  // namespace

#ifdef DTRAIN_CRC32C_X86
namespace {

// Long buffers are cut into blocks of three lanes of kLane bytes whose CRCs
// are computed at the same time (the crc32 instruction has a latency of three
// cycles but a throughput of one per cycle), then combined:
//   crc(A B C) = shift(shift(crc(A)) ^ crc0(B)) ^ crc0(C)
// where crc0 starts from a zero register and shift() advances a register over
// kLane zero bytes, a linear map applied with four 256-entry tables.
constexpr size_t kLane = 4096;

struct LaneShift {
  uint32_t t[4][256];
};

__attribute__((target("sse4.2"))) LaneShift MakeLaneShift() {
  uint32_t basis[32];
  for (int bit = 0; bit < 32; ++bit) {
    uint64_t r = 1ull << bit;
    for (size_t i = 0; i < kLane / 8; ++i) r = _mm_crc32_u64(r, 0);
    basis[bit] = static_cast<uint32_t>(r);
  }
  LaneShift s{};
  for (int k = 0; k < 4; ++k) {
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t v = 0;
      for (int j = 0; j < 8; ++j) {
        if ((b >> j) & 1u) v ^= basis[8 * k + j];
      }
      s.t[k][b] = v;
    }
  }
  return s;
}

inline uint32_t Shift(const LaneShift& s, uint32_t r) {
  return s.t[0][r & 0xFF] ^ s.t[1][(r >> 8) & 0xFF] ^ s.t[2][(r >> 16) & 0xFF] ^ s.t[3][r >> 24];
}

}  // namespace
#endif

namespace internal {

uint32_t ExtendTable(uint32_t crc, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~crc;
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7u) != 0) {
    c = (c >> 8) ^ kTables.t[0][(c ^ *p++) & 0xFFu];
    --n;
  }
  while (n >= 8) {
    const uint64_t v = LoadLE64(p) ^ c;
    c = kTables.t[7][v & 0xFF] ^ kTables.t[6][(v >> 8) & 0xFF] ^ kTables.t[5][(v >> 16) & 0xFF] ^
        kTables.t[4][(v >> 24) & 0xFF] ^ kTables.t[3][(v >> 32) & 0xFF] ^ kTables.t[2][(v >> 40) & 0xFF] ^
        kTables.t[1][(v >> 48) & 0xFF] ^ kTables.t[0][(v >> 56) & 0xFF];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) c = (c >> 8) ^ kTables.t[0][(c ^ *p++) & 0xFFu];
  return ~c;
}

#ifdef DTRAIN_CRC32C_X86
__attribute__((target("sse4.2"))) uint32_t ExtendSse42(uint32_t crc, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint64_t c = ~crc;
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7u) != 0) {
    c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
    --n;
  }
  if (n >= 3 * kLane) {
    static const LaneShift shift = MakeLaneShift();
    do {
      uint64_t a = c, b = 0, d = 0;
      for (size_t i = 0; i < kLane; i += 8) {
        a = _mm_crc32_u64(a, LoadLE64(p + i));
        b = _mm_crc32_u64(b, LoadLE64(p + kLane + i));
        d = _mm_crc32_u64(d, LoadLE64(p + 2 * kLane + i));
      }
      c = Shift(shift, Shift(shift, static_cast<uint32_t>(a)) ^ static_cast<uint32_t>(b)) ^ static_cast<uint32_t>(d);
      p += 3 * kLane;
      n -= 3 * kLane;
    } while (n >= 3 * kLane);
  }
  while (n >= 8) {
    c = _mm_crc32_u64(c, LoadLE64(p));
    p += 8;
    n -= 8;
  }
  while (n-- > 0) c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
  return ~static_cast<uint32_t>(c);
}
#else
uint32_t ExtendSse42(uint32_t crc, const void* data, size_t n) { return ExtendTable(crc, data, n); }
#endif

}  // namespace internal

uint32_t Extend(uint32_t crc, const void* data, size_t n) {
  return HaveSse42() ? internal::ExtendSse42(crc, data, n) : internal::ExtendTable(crc, data, n);
}

bool HardwareAccelerated() { return HaveSse42(); }

}  // namespace dtrain::crc32c
