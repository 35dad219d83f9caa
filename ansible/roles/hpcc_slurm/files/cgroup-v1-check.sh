#!/bin/bash
# Can Slurm's cgroup/v1 plugin work here? Prints "usable=yes|no", "mounted=<list>"
# (controllers this run had to mount) and "reason=<text>". Exit 0 either way.
# Usage: cgroup-v1-check.sh MOUNTPOINT CONTROLLER...
set -u
root=$1; shift
mounted=()
say() { echo "usable=$1"; echo "mounted=${mounted[*]:-}"; echo "reason=$2"; exit 0; }

for c in "$@"; do
  # /proc/cgroups: subsys_name hierarchy num_cgroups enabled
  enabled=$(awk -v c="$c" '$1 == c { print $4 }' /proc/cgroups)
  [ "$enabled" = 1 ] || say no "controller $c is not enabled in /proc/cgroups"
  dir="$root/$c"
  if ! awk -v d="$dir" -v c="$c" '$2 == d && $3 == "cgroup" && ("," $4 ",") ~ ("," c ",") { f = 1 } END { exit !f }' /proc/mounts \
     && [ ! -e "$dir/tasks" ]; then
    # Not mounted: a v1 hierarchy can only be added under a tmpfs, not under a cgroup2 root.
    fstype=$(stat -f -c %T "$root" 2>/dev/null)
    [ "$fstype" = tmpfs ] || say no "$root is $fstype, not a tmpfs of v1 hierarchies"
    mkdir -p "$dir" 2>/dev/null && mount -t cgroup -o "$c" cgroup "$dir" 2>/dev/null \
      || say no "controller $c is not mounted and mounting it failed"
    mounted+=("$c")
  fi
done

# Mounted is not enough (e.g. read-only in a container): try to create a child group.
probe="$root/memory/hpcc-cgroup-probe-$$"
mkdir "$probe" 2>/dev/null || say no "cannot create a memory cgroup under $root/memory"
[ -e "$probe/memory.limit_in_bytes" ] || { rmdir "$probe"; say no "memory cgroup has no memory.limit_in_bytes"; }
rmdir "$probe"
say yes "cgroup v1 controllers $* usable"
