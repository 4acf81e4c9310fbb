"""The operating system, one mechanism each: processes, cgroups, mounts' helpers, files, locks, git."""
