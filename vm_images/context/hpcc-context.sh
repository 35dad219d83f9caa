#!/bin/bash
# hpc-compute worker VM context script (install as /etc/one-context.d/net-98-hpcc, mode 0755).
#
# Runs once at boot, after the network is up (one-context "net" stage), with the VM's CONTEXT
# variables in its environment. It:
#   1. installs CONTEXT/SSH_PUBLIC_KEY (the per-attempt key hpc-compute generated) for the job
#      user (CONTEXT/USERNAME, default root), replacing any key an earlier boot installed;
#   2. makes sure the VM has its own ed25519 sshd host key (the image ships none: generated here);
#   3. waits (bounded) until sshd accepts TCP connections;
#   4. publishes SSH_HOST_KEY="<type> <base64> <comment>" and READY=YES into the VM's
#      USER_TEMPLATE through OneGate (PUT $ONEGATE_ENDPOINT/vm), so the scheduler can pin the
#      host key instead of trusting the first key it sees.
#
# Inputs (context variables): SSH_PUBLIC_KEY, USERNAME, ONEGATE_ENDPOINT, VMID, and the OneGate
# token (ONEGATE_TOKEN, else the file HPCC_TOKEN_FILE / /mnt/context/token.txt, which oned writes
# when the template has TOKEN=YES).
# Knobs (environment, defaults for a real image): HPCC_HOST_KEY=/etc/ssh/ssh_host_ed25519_key,
# HPCC_SSHD_PORT=22, HPCC_SSHD_WAIT_S=120, HPCC_PUBLISH_TRIES=5.
#
# The same script runs inside the test simulator's VMs (tests/opennebula_sim), against the
# simulator's OneGate endpoint.

set -u
umask 077

log() { printf 'hpcc-context: %s\n' "$*" >&2; }

HOST_KEY="${HPCC_HOST_KEY:-/etc/ssh/ssh_host_ed25519_key}"
SSHD_PORT="${HPCC_SSHD_PORT:-22}"
SSHD_WAIT_S="${HPCC_SSHD_WAIT_S:-120}"
TRIES="${HPCC_PUBLISH_TRIES:-5}"
JOB_USER="${USERNAME:-root}"

# -- 1. the job user's authorized key ------------------------------------------------------------
install_key() {
    local home
    home="$(getent passwd "$JOB_USER" | cut -d: -f6)"
    if [ -z "$home" ]; then
        log "user $JOB_USER does not exist"
        return 1
    fi
    if [ -z "${SSH_PUBLIC_KEY:-}" ]; then
        log "no SSH_PUBLIC_KEY in the context"
        return 1
    fi
    mkdir -p "$home/.ssh"
    chmod 0700 "$home/.ssh"
    # one-shot VM: the attempt's key is the only one that may log in
    printf '%s\n' "$SSH_PUBLIC_KEY" > "$home/.ssh/authorized_keys.hpcc-tmp"
    chmod 0600 "$home/.ssh/authorized_keys.hpcc-tmp"
    mv -f "$home/.ssh/authorized_keys.hpcc-tmp" "$home/.ssh/authorized_keys"
    chown -R "$JOB_USER": "$home/.ssh" 2>/dev/null || true
}

# -- 2. the VM's own host key --------------------------------------------------------------------
host_key() {
    if [ ! -s "$HOST_KEY" ] || [ ! -s "$HOST_KEY.pub" ]; then
        rm -f "$HOST_KEY" "$HOST_KEY.pub"
        mkdir -p "$(dirname "$HOST_KEY")"
        ssh-keygen -q -t ed25519 -N '' -C "hpcc-vm-${VMID:-unknown}" -f "$HOST_KEY" || return 1
    fi
    chmod 0600 "$HOST_KEY"
    chmod 0644 "$HOST_KEY.pub"
}

# -- 3. sshd accepting ---------------------------------------------------------------------------
wait_sshd() {
    local deadline=$((SECONDS + SSHD_WAIT_S))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$SSHD_PORT") 2>/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    log "sshd did not accept connections within ${SSHD_WAIT_S}s"
    return 1
}

# -- 4. OneGate ----------------------------------------------------------------------------------
onegate_token() {
    if [ -n "${ONEGATE_TOKEN:-}" ]; then
        printf '%s' "$ONEGATE_TOKEN"
        return 0
    fi
    local file="${HPCC_TOKEN_FILE:-/mnt/context/token.txt}"
    [ -r "$file" ] && tr -d '\n' < "$file"
}

publish_once() {
    local data="$1" token="$2" url="${ONEGATE_ENDPOINT%/}/vm"
    if command -v curl >/dev/null 2>&1; then
        curl -fsS --noproxy '*' --max-time 10 -X PUT "$url" \
            -H "X-ONEGATE-TOKEN: $token" -H "X-ONEGATE-VMID: ${VMID}" --data-binary "$data" >/dev/null
    elif command -v wget >/dev/null 2>&1; then
        wget -q --no-proxy -T 10 -O /dev/null --method=PUT "$url" \
            --header="X-ONEGATE-TOKEN: $token" --header="X-ONEGATE-VMID: ${VMID}" --body-data="$data"
    elif command -v onegate >/dev/null 2>&1; then
        onegate vm update --data "$data"
    else
        log "neither curl, wget nor onegate is installed"
        return 1
    fi
}

publish() {
    local token pub data i
    if [ -z "${ONEGATE_ENDPOINT:-}" ] || [ -z "${VMID:-}" ]; then
        log "no ONEGATE_ENDPOINT/VMID in the context (the template needs TOKEN=YES)"
        return 1
    fi
    token="$(onegate_token)" || token=""
    if [ -z "$token" ]; then
        log "no OneGate token"
        return 1
    fi
    pub="$(tr -d '\n"' < "$HOST_KEY.pub")"
    data="$(printf 'SSH_HOST_KEY = "%s"\nREADY = "YES"\n' "$pub")"
    for ((i = 1; i <= TRIES; i++)); do
        if publish_once "$data" "$token"; then
            log "published SSH_HOST_KEY and READY=YES"
            return 0
        fi
        sleep 1
    done
    log "could not reach OneGate at $ONEGATE_ENDPOINT"
    return 1
}

install_key || exit 1
host_key || exit 1
wait_sshd || exit 1
publish || exit 1
exit 0
