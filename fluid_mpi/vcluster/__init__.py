"""Virtual cluster (root only): emulated hosts in network namespaces with links, cgroups and a launch agent
standing in for ssh, for trying and testing faults on one machine; and the fault runs the tests and the
bench share. A test rig: nothing in the launcher or the runtime imports it."""
