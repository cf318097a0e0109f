"""POSIX named semaphores and shared memory: gates, permits, ledgers, the reaper."""
