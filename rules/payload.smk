# What grows with the grid (report rows, the repo README's rows, model card specs, the
# eval task list) travels in a file, never on a command line (the kernel refuses any
# single argument over 128 KiB). The content is this rule's param, so a change rewrites
# the file and reruns exactly the jobs that read it.


rule payload:
    output:
        LAYOUT["payload"],
    log:
        "logs/payload/{payload}.log",
    wildcard_constraints:
        payload=PAYLOADS,
    localrule: True
    resources:
        mem_mb=500,
        runtime=5,
        disk_mb=10,
    params:
        content=get_payload,
    run:
        write_payload(output[0], params.content, log[0])
