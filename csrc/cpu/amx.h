// The tile configuration the AMX kernels here use: palette 1, eight tiles of 64 bytes a row (A and
// B tiles of 64 int8 or 32 bf16 a row, C tiles of 16 int32 or fp32), 16 rows each unless a kernel
// names fewer for some (a block of fewer rows then loads and computes only those). A kernel loads it
// on entry (the configuration is per thread) and releases the tiles on exit. Included by
// isa_amx.cpp, after <immintrin.h>.
#pragma once

namespace {

struct alignas(64) AmxTileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline void amx_configure_tiles(const int (&rows)[8] = {16, 16, 16, 16, 16, 16, 16, 16}) {
  AmxTileConfig config;
  __builtin_memset(&config, 0, sizeof(config));
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = uint8_t(rows[t]);
  }
  _tile_loadconfig(&config);
}

}  // namespace
