#include "mathutil.h"

unsigned long math_gcd(unsigned long a, unsigned long b)
{
    while (b != 0) {
        unsigned long t = a % b;
        a = b;
        b = t;
    }
    return a;
}

unsigned long math_fib(unsigned n)
{
    unsigned long a = 0, b = 1;

    while (n-- > 0) {
        unsigned long t = a + b;
        a = b;
        b = t;
    }
    return a;
}

int math_is_prime(unsigned long n)
{
    unsigned long d;

    if (n < 2)
        return 0;
    for (d = 2; d * d <= n; d++)
        if (n % d == 0)
            return 0;
    return 1;
}
