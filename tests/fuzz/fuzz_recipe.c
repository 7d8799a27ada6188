/* fuzz_recipe: libFuzzer target for kd_recipe_parse, which reads user files and the recipe text
 * a coordinator sends in Welcome. Any input must be parsed or rejected cleanly; an accepted
 * recipe written back with kd_recipe_to_yaml must parse again and write back identically. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kd_recipe.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* An exact-size heap copy (no terminator) so ASan sees any read past len. */
    char *text = malloc(size ? size : 1);
    if (!text) return 0;
    memcpy(text, data, size);

    static kd_recipe_t r, back; /* large: keep them off the stack */
    char err[1024];
    err[0] = 0;
    if (kd_recipe_parse("fuzz.yaml", text, size, NULL, 0, &r, err, sizeof err) != 0) {
        if (err[0] == 0 || memchr(err, 0, sizeof err) == NULL) __builtin_trap();
        free(text);
        return 0;
    }
    char *yaml = kd_recipe_to_yaml(&r);
    if (!yaml) __builtin_trap();
    if (kd_recipe_parse("fuzz-roundtrip.yaml", yaml, strlen(yaml), NULL, 0, &back, err,
                        sizeof err) != 0)
        __builtin_trap();
    /* The written form is a fixed point: nothing is lost or changed by reading it back. */
    char *yaml2 = kd_recipe_to_yaml(&back);
    if (!yaml2 || strcmp(yaml, yaml2) != 0) __builtin_trap();
    free(yaml2);
    free(yaml);
    free(text);
    return 0;
}
