#!/bin/sh
# A private CA, a server certificate, a client certificate and a bearer token for
# docker-compose.secure.yml (or for `chargpt serve` anywhere), made with openssl.
#
#   deploy/make-secrets.sh [DIR [NAME...]]
#
# DIR (default: secrets, ignored by git and docker) gets:
#   ca.crt                 the CA clients verify the server with (--tls-ca, CHARGPT_TLS_CA)
#   ca.key                 the CA's key: only for issuing more certificates; never mounted
#   server.crt server.key  for --tls-cert/--tls-key; names: server (the compose service),
#                          localhost, 127.0.0.1, ::1 and every NAME given
#   client.crt client.key  a client identity for mutual TLS (--tls-client-ca ca.crt)
#   tokens                 one bearer token (--auth-token-file; clients: --token-file)
#
# DIR is 0700, readable only by you; the files that containers mount are 0644 inside it,
# because compose mounts a file secret as it is on the host (it cannot change the owner)
# and the image runs as user 10001.
set -eu

dir=${1:-secrets}
[ $# -gt 0 ] && shift
if [ -e "$dir/ca.crt" ]; then
  echo "$dir/ca.crt already exists: remove $dir to start over" >&2
  exit 1
fi
umask 077
mkdir -p "$dir"
chmod 700 "$dir"
cd "$dir"

names="DNS:server,DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
  case $name in
    *:*) names="$names,IP:$name" ;;           # IPv6
    *[!0-9.]*) names="$names,DNS:$name" ;;
    *) names="$names,IP:$name" ;;             # IPv4
  esac
done

# EC P-256 keys; the CA for 10 years, certificates for 397 days (what browsers accept).
new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

new_key ca.key
openssl req -x509 -new -key ca.key -out ca.crt -days 3650 -subj "/CN=chargpt private CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign"

issue() {  # issue NAME SUBJECT EXTENSIONS
  new_key "$1.key"
  openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 397 \
    -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  rm "$1.csr" "$1.ext"
}
issue server "chargpt server" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$names"
issue client "chargpt client" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
rm -f ca.srl

openssl rand -hex 32 > tokens
chmod 644 ca.crt server.crt server.key client.crt client.key tokens
echo "made in $dir: ca.crt server.crt server.key client.crt client.key tokens (and ca.key)"
