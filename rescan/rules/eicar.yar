/*
  Bundled default rules of rescan: used when no --rules is given.
  The EICAR anti-virus test file (https://www.eicar.org/download-anti-malware-testfile/).
*/
rule EICAR_Test_File
{
    meta:
        author = "rescan"
        description = "EICAR anti-virus test file"
        reference = "https://www.eicar.org/download-anti-malware-testfile/"
    strings:
        $eicar = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
    condition:
        $eicar in (0..128)
}
