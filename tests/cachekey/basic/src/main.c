int main(void) { return util(); }
