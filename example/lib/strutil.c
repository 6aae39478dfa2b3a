#include "strutil.h"

#include <ctype.h>
#include <string.h>

void str_reverse(char *dst, size_t cap, const char *src)
{
    size_t n = strlen(src);
    size_t i;

    if (cap == 0)
        return;
    if (n >= cap)
        n = cap - 1;
    for (i = 0; i < n; i++)
        dst[i] = src[n - 1 - i];
    dst[n] = '\0';
}

void str_upper(char *dst, size_t cap, const char *src)
{
    size_t i;

    if (cap == 0)
        return;
    for (i = 0; src[i] != '\0' && i + 1 < cap; i++)
        dst[i] = (char)toupper((unsigned char)src[i]);
    dst[i] = '\0';
}

size_t str_count_words(const char *s)
{
    size_t words = 0;
    int in_word = 0;

    for (; *s != '\0'; s++) {
        if (isspace((unsigned char)*s)) {
            in_word = 0;
        } else if (!in_word) {
            in_word = 1;
            words++;
        }
    }
    return words;
}
