#!/bin/sh
echo "coverage reports are not generated in this workspace (remote_coverage_tools is a stand-in)" >&2
exit 1
