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

# wait_port PORT PID LOG: waits (at most 10 s) until something accepts on the loopback PORT;
# fails, printing LOG, if process PID exits first or the time runs out.
wait_port() {
  local port=$1 pid=$2 log=$3
  for _ in $(seq 1 100); do
    (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "the server exited before listening on $port; its log:" >&2
      cat "$log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "nothing listens on $port after 10 s; the server's log:" >&2
  cat "$log" >&2
  return 1
}
