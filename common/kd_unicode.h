/* kd_unicode: the character classes GPT-2's pre-tokenizer regex uses, as JavaScript defines them
 * (\p{L}, \p{N}, \s), for kd_tokenizer. The tables are generated (kd_unicode_tables.c, by
 * scripts/gen_unicode_tables.js); read-only, thread-safe. Private to common/. */
#ifndef KD_UNICODE_H
#define KD_UNICODE_H

#include <stdint.h>

typedef enum {
    KD_UC_OTHER = 0, /* none of the below: [^\s\p{L}\p{N}] */
    KD_UC_LETTER,    /* \p{L} */
    KD_UC_NUMBER,    /* \p{N} */
    KD_UC_SPACE,     /* \s: WhiteSpace and LineTerminator, U+FEFF included */
} kd_uc_class_t;

/* The class of code point cp (0..0x10FFFF; anything else is KD_UC_OTHER). */
kd_uc_class_t kd_unicode_class(uint32_t cp);

#endif
