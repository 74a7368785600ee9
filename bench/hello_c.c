/*
 * The C peer of the benchmarks: the smallest libfcgi responder, an FCGI_Accept() loop that
 * writes the same bytes as bench/apps.py's hello app. Run under `spawn-fcgi -F 2`, it is the
 * floor a FastCGI backend can reach on this machine (libfcgi reads and writes with a few
 * syscalls per request and does no per-request allocation worth measuring). A POST's body
 * (bench.py --body) is read first, as the Python hello app reads it.
 */
#include <fcgi_stdio.h>
#include <stdlib.h>

int main(void) {
    static char body[65536];
    while (FCGI_Accept() >= 0) {
        const char *clen = getenv("CONTENT_LENGTH");
        if (clen && *clen) {
            while (fread(body, 1, sizeof body, stdin) > 0) {
            }
        }
        fputs("Status: 200 OK\r\n"
              "Content-Type: text/plain\r\n"
              "Content-Length: 13\r\n"
              "\r\n"
              "Hello, World!",
              stdout);
    }
    return 0;
}
