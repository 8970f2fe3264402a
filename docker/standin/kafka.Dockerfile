# Stand-in for apache/kafka: the noida-db broker (Kafka protocol only) behind a start script
# that reads the image's KAFKA_* variables (kafka-entrypoint.sh says which ones).
ARG ROOTFS
FROM ${ROOTFS}
COPY kafka-entrypoint.sh /usr/local/bin/kafka-entrypoint.sh
ENV KAFKA_LISTENERS=PLAINTEXT://:9092 KAFKA_LOG_DIRS=/var/lib/kafka/data
EXPOSE 9092
ENTRYPOINT ["/usr/local/bin/kafka-entrypoint.sh"]
