/* mathutil: small integer helpers for the hitz example. */
#ifndef TINY_MATHUTIL_H
#define TINY_MATHUTIL_H

unsigned long math_gcd(unsigned long a, unsigned long b);
unsigned long math_fib(unsigned n);
int math_is_prime(unsigned long n);

#endif
