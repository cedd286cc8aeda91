# Shared by the scripts in this folder, which source it from the repository root.

# free_port: prints a loopback TCP port nothing listens on, below the kernel's ephemeral range
# (32768-60999) so that no client socket of a running benchmark holds it.
free_port() {
  local port
  for _ in $(seq 1 50); do
    port=$((20000 + RANDOM % 12000))
    if ! (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then echo "$port"; return 0; fi
  done
  echo "no free port found" >&2
  return 1
}
