"""Spins argv[2] processes, each in a session of its own, while the file argv[1] exists."""
import os
import sys
import time

# One child per burner, each in a session of its own: without cgroups every session is an
# autogroup with the same share as the whole other box, which is what makes B slow.
flag = sys.argv[1]
for _ in range(int(sys.argv[2])):
    if os.fork() == 0:
        os.setsid()
        while True:
            if os.path.exists(flag):
                for _ in range(100000):
                    pass
            else:
                time.sleep(0.02)
while True:
    time.sleep(60)
