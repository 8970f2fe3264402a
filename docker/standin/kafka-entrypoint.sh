#!/bin/sh
# Stand-in for the apache/kafka image's start script: noida-db (Kafka protocol, one broker),
# configured from the same KAFKA_* variables as far as it can be. Only shell built-ins: the
# image holds no other tools.
#
# noida-db serves one listener, the PLAINTEXT one of KAFKA_LISTENERS, and advertises the address
# it binds. So it binds the host of the PLAINTEXT entry of KAFKA_ADVERTISED_LISTENERS, which must
# then be this container's own name (a compose service name such as `kafka` resolves to the
# container's address). A loopback or missing host binds 0.0.0.0 instead: that address works
# for clients on the Docker host, through a port published as <port>:<port>, and for containers
# in the host's network. The CONTROLLER and any other listener are not served.
set -eu

listeners="${KAFKA_LISTENERS:-PLAINTEXT://:9092}"
case ",$listeners" in
    *,PLAINTEXT://*) ;;
    *) echo "kafka stand-in: no PLAINTEXT listener in KAFKA_LISTENERS=$listeners" >&2; exit 64 ;;
esac
port="${listeners#*PLAINTEXT://}"  # [host]:port[,more listeners]
port="${port%%,*}"
port="${port##*:}"

bind=0.0.0.0
advertised="${KAFKA_ADVERTISED_LISTENERS:-}"
case ",$advertised" in
    *,PLAINTEXT://*)
        host="${advertised#*PLAINTEXT://}"
        host="${host%%,*}"
        host="${host%:*}"
        case "$host" in
            "" | localhost | 127.* | 0.0.0.0) ;;
            *) bind="$host" ;;
        esac
        ;;
esac
data_dir="${KAFKA_LOG_DIRS:-/var/lib/kafka/data}"

echo "kafka stand-in (noida-db): PLAINTEXT on $bind:$port, data in $data_dir" >&2
exec /opt/noida/noida-db start --only kafka --host "$bind" --kafka-port "$port" --data-dir "$data_dir"
