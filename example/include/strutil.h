/* strutil: small string helpers for the hitz example. */
#ifndef TINY_STRUTIL_H
#define TINY_STRUTIL_H

#include <stddef.h>

/* Writes the reverse of src into dst (capacity cap, NUL-terminated). */
void str_reverse(char *dst, size_t cap, const char *src);

/* Writes src upper-cased (ASCII only) into dst (capacity cap). */
void str_upper(char *dst, size_t cap, const char *src);

/* Counts runs of non-space characters. */
size_t str_count_words(const char *s);

#endif
