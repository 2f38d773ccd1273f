#!/bin/bash
# usage: etcd3.sh DIR  -> starts 3 members on 127.0.0.1, client 23791..3, peer 23801..3
D=${1:-$(mktemp -d)}
CLUSTER=m1=http://127.0.0.1:23801,m2=http://127.0.0.1:23802,m3=http://127.0.0.1:23803
for i in 1 2 3; do
  mkdir -p -m 700 $D/m$i
  etcd --name m$i --data-dir $D/m$i \
    --listen-client-urls http://127.0.0.1:2379$i --advertise-client-urls http://127.0.0.1:2379$i \
    --listen-peer-urls http://127.0.0.1:2380$i --initial-advertise-peer-urls http://127.0.0.1:2380$i \
    --initial-cluster $CLUSTER --initial-cluster-token credproxy-test --initial-cluster-state new \
    --log-level warn --logger zap > $D/m$i.log 2>&1 &
  echo $! > $D/m$i.pid
done
