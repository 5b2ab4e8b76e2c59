/* Lookup tables of the bitmap kernels, built once when the module loads and read-only afterwards. */
#include "spz.h"

uint8_t spz_pop8[256];
uint8_t spz_expand16[256][16] __attribute__((aligned(16)));
uint8_t spz_expand_sparse[2][256][16] __attribute__((aligned(16)));
uint8_t spz_compact16[256][16] __attribute__((aligned(16)));
uint16_t spz_sign16[256][8];

void spz_tables_init(void) {
    for (int m = 0; m < 256; m++) {
        spz_pop8[m] = (uint8_t)((m & 1) + spz_pop8[m >> 1]);
        memset(spz_compact16[m], 0x80, 16); /* pshufb writes 0 where the mask byte has its top bit set */
        for (int j = 0, p = 0; j < 8; j++) {
            int set = m >> j & 1;
            spz_expand16[m][2 * j] = set ? (uint8_t)(2 * p) : 0x80;
            spz_expand16[m][2 * j + 1] = set ? (uint8_t)(2 * p + 1) : 0x80;
            uint8_t *narrow = spz_expand_sparse[0][m], *wide = spz_expand_sparse[1][m];
            narrow[2 * j] = 0x80; /* narrow: the value byte is the high byte, the low byte 0 */
            narrow[2 * j + 1] = set ? (uint8_t)p : 0x80;
            wide[2 * j] = spz_expand16[m][2 * j];
            wide[2 * j + 1] = spz_expand16[m][2 * j + 1];
            if (set) {
                spz_compact16[m][2 * p] = (uint8_t)(2 * j);
                spz_compact16[m][2 * p + 1] = (uint8_t)(2 * j + 1);
            }
            spz_sign16[m][j] = (uint16_t)(set << 15);
            p += set;
        }
    }
}
