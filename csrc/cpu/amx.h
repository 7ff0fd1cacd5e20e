// The tile configuration every AMX kernel here uses: palette 1, all eight tiles 16 rows x 64
// bytes (A and B tiles of 64 int8 or 32 bf16 a row, C tiles of 16 int32 or fp32). A kernel loads it
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

inline void amx_configure_tiles() {
  AmxTileConfig config;
  __builtin_memset(&config, 0, sizeof(config));
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}

}  // namespace
