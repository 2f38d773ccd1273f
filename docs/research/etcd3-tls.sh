#!/bin/bash
# usage: etcd3-tls.sh DIR PKI -> 3 members, https clients on 127.0.0.1:2379{1,2,3}, https peers 2380{1,2,3}, client-cert auth
D=$1; P=$2
CLUSTER=m1=https://127.0.0.1:23801,m2=https://127.0.0.1:23802,m3=https://127.0.0.1:23803
for i in 1 2 3; do
  mkdir -p -m 700 $D/m$i
  etcd --name m$i --data-dir $D/m$i \
    --listen-client-urls https://127.0.0.1:2379$i --advertise-client-urls https://127.0.0.1:2379$i \
    --listen-peer-urls https://127.0.0.1:2380$i --initial-advertise-peer-urls https://127.0.0.1:2380$i \
    --initial-cluster $CLUSTER --initial-cluster-token credproxy-test --initial-cluster-state new \
    --cert-file $P/server.pem --key-file $P/server.key --trusted-ca-file $P/ca.pem --client-cert-auth \
    --peer-cert-file $P/server.pem --peer-key-file $P/server.key --peer-trusted-ca-file $P/ca.pem --peer-client-cert-auth \
    --log-level warn > $D/m$i.log 2>&1 &
  echo $! > $D/m$i.pid
done
