/* fl_utf8.h: the one UTF-8 validity rule of the C core (names and headers read from files; messages must stay valid
 * UTF-8 because the binding decodes them into Python strs). Host code only. */
#ifndef FL_UTF8_H
#define FL_UTF8_H

#include <stddef.h>

/* Length (1-4) of the well-formed UTF-8 character at p, with n >= 1 bytes readable there; 0 when the bytes there do
 * not start one (a stray continuation byte, an overlong form, a surrogate, above U+10FFFF, or cut off by n). The
 * table of Unicode's "Well-Formed UTF-8 Byte Sequences" (chapter 3, table 3-7). */
static inline size_t fl_utf8_len(const unsigned char *p, size_t n) {
    const unsigned c = p[0];
    if (c < 0x80) return 1;
    size_t k;
    unsigned lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) k = 2;
    else if (c >= 0xe0 && c <= 0xef) { k = 3; if (c == 0xe0) lo = 0xa0; if (c == 0xed) hi = 0x9f; }
    else if (c >= 0xf0 && c <= 0xf4) { k = 4; if (c == 0xf0) lo = 0x90; if (c == 0xf4) hi = 0x8f; }
    else return 0;
    if (n < k || p[1] < lo || p[1] > hi) return 0;
    for (size_t m = 2; m < k; m++)
        if ((p[m] & 0xc0) != 0x80) return 0;
    return k;
}

#endif
