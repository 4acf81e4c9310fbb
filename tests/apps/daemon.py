"""Double-forks a daemon that leaves the process group, the session and the box dir, then idles."""
import os
import sys
import time

if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.chdir("/")
        with open(sys.argv[1], "w") as f:
            f.write(str(os.getpid()))
        while True:
            time.sleep(1)
    os._exit(0)
print("spawned a daemon", flush=True)
while True:
    time.sleep(1)
