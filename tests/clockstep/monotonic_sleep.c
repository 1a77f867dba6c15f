/* Loaded before libfaketime: clock_nanosleep goes to the kernel unchanged, so Python's
   time.sleep works when libfaketime leaves the monotonic clock alone (libfaketime 0.9.10 hands
   the kernel a negative absolute time: EINVAL, its issue #426). The tests fake only the wall
   clock, which sleeping on CLOCK_MONOTONIC never looks at. */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int clock_nanosleep(clockid_t clock_id, int flags, const struct timespec *request,
                    struct timespec *remain) {
  /* glibc's clock_nanosleep returns the error number instead of setting errno. */
  return syscall(SYS_clock_nanosleep, clock_id, flags, request, remain) == 0 ? 0 : errno;
}
